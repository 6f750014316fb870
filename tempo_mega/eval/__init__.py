"""Evaluation: avg@k, pass@k, answer diversity, reward-drift monitors; benchmark loaders and the runner in benchmarks.py, runner.py."""

from tempo_mega.eval.metrics import (
    auroc,
    avg_at_k,
    distinct_answer_ratio,
    distinct_answers,
    expected_calibration_error,
    pass_at_k,
    pass_at_k_batch,
    reward_to_prob,
)

__all__ = [
    "auroc",
    "avg_at_k",
    "distinct_answer_ratio",
    "distinct_answers",
    "expected_calibration_error",
    "pass_at_k",
    "pass_at_k_batch",
    "reward_to_prob",
]
