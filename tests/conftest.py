"""Suite-wide setup: Triton's CPU interpreter on machines without CUDA, `gpu` tests skipped there and
tests/integration marked `slow`; tests/support on the path of the processes tests start; the fixtures
shared by several modules (the SGLang fakes come from tests/support/sglang.py)."""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

# tests/support for the processes tests start (torchrun workers, scripts): pytest itself has it on sys.path
# through [tool.pytest.ini_options] pythonpath
TESTS = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must be decided before the first `import triton` anywhere in the process
    os.environ.setdefault("TRITON_INTERPRET", "1")


from support.sglang import fake, model_dir, tensor_sync  # noqa: E402, F401  (fixtures of the SGLang tests)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:  # multi-process worlds and whole runs: slow as a whole
            item.add_marker(pytest.mark.slow)
        if not HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module of tiny-model tests: such models gain nothing from
    threads, and on a busy 2-core box their spin-waits make every op ~10x slower. Restored after.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self, **init_kwargs):
        self.init_kwargs = init_kwargs
        self.id = init_kwargs.get("id") or "run123"
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def log(self, data, step=None):
        self.logged.append((data, step))

    def finish(self):
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    # setenv first so that monkeypatch restores the original (possibly absent) WANDB_MODE afterwards,
    # undoing the sink's os.environ.setdefault
    monkeypatch.setenv("WANDB_MODE", "unset")
    monkeypatch.delenv("WANDB_MODE")
    return module
