"""Rollout engines behind one protocol: hf.py (CPU reference), sglang.py (GPU)."""

from tempo_mega.rollout.base import RolloutEngine, Sample, SamplingParams

__all__ = ["RolloutEngine", "Sample", "SamplingParams"]
