"""Train backends behind one protocol (``base.TrainBackend``): torch.py (single process), megatron/ (TP/PP/DP).

The names below load on first use, so that reading ``backends.megatron.config`` (config validation,
``tempo-mega plan``) does not import torch.
"""

from __future__ import annotations

import importlib

_NAMES = {"LossFn": "base", "OptimConfig": "base", "TrainBackend": "base"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'tempo_mega.backends' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tempo_mega.backends.{_NAMES[name]}"), name)
