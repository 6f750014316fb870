"""The package installs as documented: kernels/ only as tempo_mega.kernels, no CUDA imports."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_py(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_kernels_is_a_subpackage_only(tmp_path):
    code = (
        "import importlib.util, tempo_mega.kernels as k; "
        "print(importlib.util.find_spec('kernels') is None, k.__name__)"
    )
    assert run_py(code, tmp_path) == "True tempo_mega.kernels"


def test_import_pulls_no_heavy_or_cuda_module(tmp_path):
    code = (
        "import sys, tempo_mega, tempo_mega.algo, tempo_mega.rewards, tempo_mega.eval, tempo_mega.batch, "
        "tempo_mega.controller, tempo_mega.config, tempo_mega.kernels; "
        # (not pynvml: torch.cuda itself imports it whenever nvidia-ml-py is installed)
        "bad = [m for m in ('megatron', 'transformer_engine', 'sglang', 'triton', 'wandb', 'kernels') "
        "if m in sys.modules]; print(bad)"
    )
    assert run_py(code, tmp_path) == "[]"


def test_every_package_folder_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_console_script_selfcheck(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tempo_mega.cli", "selfcheck"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), out.stdout
