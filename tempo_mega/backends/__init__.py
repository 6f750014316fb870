"""Train backends behind one protocol (``base.TrainBackend``): torch.py (single process), megatron/ (TP/PP/DP).

The names below load on first use, so that reading ``backends.megatron.config`` (config validation,
``tempo-mega plan``) does not import torch.
"""

from __future__ import annotations

from tempo_mega._lazy import lazy_getattr

_NAMES = {"LossFn": "base", "OptimConfig": "base", "TrainBackend": "base"}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES)
