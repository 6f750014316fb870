"""Train backends behind one protocol: torch.py (single process), megatron/ (TP/PP/DP)."""

from tempo_mega.backends.base import LossFn, TrainBackend

__all__ = ["LossFn", "TrainBackend"]
