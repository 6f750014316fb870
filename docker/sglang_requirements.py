#!/usr/bin/env python
"""Print what SGLang needs besides the container's torch stack, as a requirements file.

Run after ``pip install --no-deps sglang <its torch-pinned kernel packages>`` (see the Dockerfile).
SGLang 0.5.23 and three of its kernel packages pin torch exactly (``torch==2.14.1``); installed with
their dependencies, pip would replace the NGC build of torch. This reads their requirements from the
installed metadata, drops the torch stack and the --no-deps packages themselves, evaluates markers
for this interpreter, and prints the rest for ``pip install -c ... -r``. It exits 1 if the kernel
packages installed are not the versions the installed sglang asks for (an sglang upgrade that
changed them: update docker/constraints.txt).
"""

import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Installed with --no-deps: sglang and the kernel packages whose metadata pins torch==2.14.1 / >=2.14.1.
NO_DEPS = ("sglang", "sglang-kernel", "sgl-deep-ep", "sgl-flash-mla")
# The container's; never reinstalled. torchaudio and torchcodec are left out: the NGC image may not
# ship them, sglang needs them only for audio/video inputs, and their wheels would pull a PyPI torch.
TORCH_STACK = ("torch", "torchvision", "torchaudio", "torchcodec", "triton", "pytorch-triton")


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": ""})


def main() -> int:
    skip = {canonicalize_name(n) for n in (*NO_DEPS, *TORCH_STACK)}
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, md.requires(NO_DEPS[0]) or []) if _applies(r)}
    problems = []
    for name in NO_DEPS[1:]:
        want = wanted.get(canonicalize_name(name))
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name} is not installed")
            continue
        if want is None:
            problems.append(f"sglang {md.version('sglang')} no longer requires {name} (installed: {have})")
        elif not want.specifier.contains(have, prereleases=True):
            problems.append(f"sglang {md.version('sglang')} wants {want}, installed {name}=={have}")
    if problems:
        print("sglang_requirements: " + "; ".join(problems) + ": update docker/constraints.txt", file=sys.stderr)
        return 1
    lines = set()
    for dist in NO_DEPS:
        for text in md.requires(dist) or []:
            req = Requirement(text)
            if not _applies(req) or canonicalize_name(req.name) in skip:
                continue
            req.marker = None
            lines.add(str(req))
    print("\n".join(sorted(lines, key=str.lower)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
