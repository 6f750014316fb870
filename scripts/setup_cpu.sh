#!/usr/bin/env bash
# Set up tempo-mega on a CPU-only machine: the CPU build of torch first (a loose `torch` requirement
# with no torch installed would pull a multi-GB CUDA build), then this package with its dev extras.
# On a GPU machine or in an NGC container, skip the torch line: `pip install -e '.[dev]'` keeps the
# installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
python - <<'PY'
import importlib.util, torch
assert not torch.cuda.is_available() or torch.version.cuda, "unexpected torch build"
print(f"torch {torch.__version__} (cuda: {torch.version.cuda}), tempo_mega importable:",
      importlib.util.find_spec("tempo_mega") is not None)
PY
