"""Rewards: strict (or explicitly lenient) math grading, and the TTRL and EMPO test-time rewards."""

from tempo_mega.rewards.clusters import cluster_answers, cluster_sizes
from tempo_mega.rewards.empo import empo_rewards
from tempo_mega.rewards.math import (
    DEFAULT_TIMEOUT_S,
    LENIENT_REL_TOL,
    compute_score,
    default_grading_workers,
    equivalences,
    extract_answer,
    grade_responses,
    is_equivalent,
    normalize_answer,
    start_grading_workers,
)
from tempo_mega.rewards.pseudo import pseudo_rewards
from tempo_mega.rewards.ttrl import ttrl_rewards

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LENIENT_REL_TOL",
    "cluster_answers",
    "cluster_sizes",
    "compute_score",
    "default_grading_workers",
    "empo_rewards",
    "equivalences",
    "extract_answer",
    "grade_responses",
    "is_equivalent",
    "normalize_answer",
    "pseudo_rewards",
    "start_grading_workers",
    "ttrl_rewards",
]
