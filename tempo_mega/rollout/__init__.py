"""Rollout engines behind one protocol (``base.RolloutEngine``): hf.py (CPU reference), sglang/ (GPU),
fake_sglang/ (a fake SGLang server for CPU tests).

The names below load on first use, so that reading ``rollout.sglang.config`` (config validation,
``tempo-mega plan``) does not import torch.
"""

from __future__ import annotations

from tempo_mega._lazy import lazy_getattr

_NAMES = {"RolloutEngine": "base", "Sample": "base", "SamplingParams": "base"}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES)
