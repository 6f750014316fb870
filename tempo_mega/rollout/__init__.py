"""Rollout engines behind one protocol (``base.RolloutEngine``): hf.py (CPU reference), sglang/ (GPU),
fake_sglang/ (a fake SGLang server for CPU tests).

The names below load on first use, so that reading ``rollout.sglang.config`` (config validation,
``tempo-mega plan``) does not import torch.
"""

from __future__ import annotations

import importlib

_NAMES = {"RolloutEngine": "base", "Sample": "base", "SamplingParams": "base"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'tempo_mega.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tempo_mega.rollout.{_NAMES[name]}"), name)
