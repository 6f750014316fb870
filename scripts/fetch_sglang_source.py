"""Fetch the request/struct sources of the SGLang release the client targets, for the CPU contract test.

SGLang cannot be installed on a CPU machine (docs/CPU_TESTING.md), and even with ``--no-deps`` its
``sglang`` package does not import without a dozen of its dependencies. The contract test
(tests/unit/test_sglang_contract.py) therefore reads SGLang's own source: the request structs of
``srt/managers/io_struct.py`` (with ``ast``), the route -> struct bindings of ``srt/entrypoints/http_server.py``,
the in-process ``Engine``'s signatures (``srt/entrypoints/engine.py``), the tensor serializer
(``srt/utils/common.py``) and the generated ``/generate`` JSON contract (``api/v1/api_types.py``, which needs
only msgspec). This script downloads the wheel from the package index with pip (``--no-deps``; about 40 MB),
extracts just those files into ``DEST`` (default ``$TEMPO_SGLANG_SRC`` or
``~/.cache/tempo-mega/sglang-<version>``) and drops the wheel. It does nothing when ``DEST`` already holds them.

    python scripts/fetch_sglang_source.py            # scripts/setup_cpu.sh runs this
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SGLANG_VERSION = "0.5.23"
FILES = (
    "sglang/srt/managers/io_struct.py",
    "sglang/srt/entrypoints/http_server.py",
    "sglang/srt/entrypoints/engine.py",
    "sglang/srt/utils/common.py",
    "sglang/srt/sampling/sampling_params.py",
    "sglang/api/v1/api_types.py",
)
MARKER = "SGLANG_VERSION"


def default_dest(version: str = SGLANG_VERSION) -> Path:
    env = os.environ.get("TEMPO_SGLANG_SRC")
    return Path(env) if env else Path.home() / ".cache" / "tempo-mega" / f"sglang-{version}"


def is_complete(dest: Path, version: str = SGLANG_VERSION) -> bool:
    marker = dest / MARKER
    return marker.is_file() and marker.read_text().strip() == version and all((dest / f).is_file() for f in FILES)


def fetch(dest: Path, version: str = SGLANG_VERSION) -> Path:
    if is_complete(dest, version):
        return dest
    with tempfile.TemporaryDirectory(prefix="sglang_wheel_") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", tmp, f"sglang=={version}"], check=True)
        wheels = sorted(Path(tmp).glob(f"sglang-{version}-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download sglang=={version} left no wheel in {tmp}")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as whl:
            names = set(whl.namelist())
            missing = [f for f in FILES if f not in names]
            if missing:
                raise FileNotFoundError(f"{wheels[0].name} has no {', '.join(missing)}")
            for f in FILES:
                target = dest / f
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(whl.read(f))
    (dest / MARKER).write_text(version + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", nargs="?", type=Path, default=None, help="default: $TEMPO_SGLANG_SRC or ~/.cache/...")
    p.add_argument("--version", default=SGLANG_VERSION)
    args = p.parse_args(argv)
    dest = fetch(args.dest or default_dest(args.version), args.version)
    print(f"sglang {args.version} sources for the contract test: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
