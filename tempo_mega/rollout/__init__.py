"""Rollout engines behind one protocol (``base.RolloutEngine``): hf.py (CPU reference), sglang/ (GPU),
rank_zero.py (one sampler for a multi-rank trainer). The fake SGLang server the CPU tests run is test
support (``tests/support/fake_sglang/``).

The names below load on first use, so that reading ``rollout.sglang.config`` (config validation,
``tempo-mega plan``) does not import torch.
"""

from __future__ import annotations

from tempo_mega._lazy import lazy_getattr

_NAMES = {"RolloutEngine": "base", "Sample": "base", "SamplingParams": "base"}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES)
