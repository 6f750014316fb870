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


# where a top-level `kernels` resolves: None, or another package's (transformers >= 5 depends on one)
WHERE_KERNELS = ("import importlib.util, os; s = importlib.util.find_spec('kernels'); "
                 "print('ours' if s and os.path.dirname(os.path.abspath(s.origin)) == {ours!r} else 'not ours')")


@pytest.mark.slow
def test_kernels_is_a_subpackage_only(tmp_path):
    code = "import tempo_mega.kernels as k; print(k.__name__); " + WHERE_KERNELS.format(ours=str(ROOT / "kernels"))
    assert run_py(code, tmp_path).split() == ["tempo_mega.kernels", "not", "ours"]


@pytest.mark.slow
def test_checkout_root_does_not_shadow_the_kernels_package():
    """Started from the checkout's top, Python puts it first on sys.path, where kernels/ would shadow
    the `kernels` package transformers imports: importing tempo_mega takes the folder off the path."""
    where = WHERE_KERNELS.format(ours=str(ROOT / "kernels"))
    assert run_py(where, ROOT) == "ours"  # the hazard is real: without tempo_mega, kernels/ is found
    assert run_py("import tempo_mega; " + where, ROOT) == "not ours"


@pytest.mark.slow
def test_launched_server_does_not_see_the_checkout_root(tmp_path):
    """An SGLang server is `python -m sglang.launch_server` started from wherever the trainer runs:
    from the checkout's top its sys.path must not begin with it (tempo_mega is not imported there)."""
    from tempo_mega.rollout.sglang import server_process_kwargs

    cmd = [sys.executable, "-m", "json.tool", "--help"]  # any -m module; the probe below is the point
    probe = [sys.executable, "-c", "import sys; print(sys.path[0])"] if sys.version_info >= (3, 11) else cmd
    kw = server_process_kwargs(list(probe), tmp_path)
    assert kw["env"]["PYTHONSAFEPATH"] == "1"
    out = subprocess.run(probe, cwd=kw.get("cwd", ROOT), env=kw["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if sys.version_info >= (3, 11):
        assert Path(out.stdout.strip() or ".").resolve() != ROOT


@pytest.mark.slow
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


@pytest.mark.slow
def test_console_script_selfcheck(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tempo_mega.cli", "selfcheck"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), out.stdout
