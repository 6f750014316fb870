#!/usr/bin/env bash
# Set up tempo-mega on a CPU-only machine: the CPU build of torch first (a loose `torch` requirement
# with no torch installed would pull a multi-GB CUDA build), then this package with its dev extras.
# On a GPU machine or in an NGC container, skip the torch line: `pip install -e '.[dev]'` keeps the
# installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# megatron-core for the CPU (gloo) tests of the Megatron backend: --no-deps, because its only real
# dependencies (torch, numpy, packaging) are already here and nothing may pull a CUDA torch.
# 0.16.1 is the newest release for Python 3.11; NGC (Python 3.12) pins its own in the Dockerfile.
python -m pip install --quiet --disable-pip-version-check --no-deps "megatron-core==0.16.1"
python -m pip install --quiet --disable-pip-version-check psutil  # dist_checkpointing needs it
# SGLang's own request structs and /generate contract for tests/unit/test_sglang_contract.py: a few source
# files taken from the sglang==0.5.23 wheel (pip download --no-deps, ~40 MB, dropped after) into
# ~/.cache/tempo-mega (or $TEMPO_SGLANG_SRC). sglang itself is never installed here (docs/CPU_TESTING.md).
python scripts/fetch_sglang_source.py
python - <<'PY'
import importlib.util, torch
assert not torch.cuda.is_available() or torch.version.cuda, "unexpected torch build"
print(f"torch {torch.__version__} (cuda: {torch.version.cuda}), tempo_mega importable:",
      importlib.util.find_spec("tempo_mega") is not None)
PY
