"""TTRL reward: majority vote over the group's answers as a pseudo label."""

from __future__ import annotations

from collections.abc import Sequence

from tempo_mega.rewards.clusters import cluster_answers, cluster_sizes
from tempo_mega.rewards.math import extract_answer


def ttrl_rewards(
    solutions: Sequence[str], *, positive: float = 1.0, negative: float = -1.0
) -> tuple[list[float], dict]:
    """TTRL rewards for one prompt's group of responses.

    The majority answer is the largest cluster of equivalent extracted answers
    (``cluster_answers``: ``1/2`` and ``0.5`` vote together); a tie goes to the cluster seen first.
    Responses in the majority cluster get ``positive``, all others (no answer included) get
    ``negative``. Responses without an answer never form the majority: if none has one, all get
    ``negative``.

    Returns ``(rewards [len(solutions)], metrics)`` with metrics ``majority_share`` (majority
    cluster size / group size, 0.0 without a majority), ``majority_answer`` (the first-seen answer
    of the majority cluster, or None) and ``num_clusters``.
    """
    answers = [extract_answer(s) for s in solutions]
    ids = cluster_answers(answers)
    sizes = cluster_sizes(ids)
    if not sizes:
        return [negative] * len(solutions), {
            "majority_share": 0.0,
            "majority_answer": None,
            "num_clusters": 0,
        }
    majority = max(range(len(sizes)), key=lambda k: (sizes[k], -k))  # ties: lowest id = first seen
    rewards = [positive if cluster == majority else negative for cluster in ids]
    metrics = {
        "majority_share": sizes[majority] / len(solutions),
        "majority_answer": answers[ids.index(majority)],
        "num_clusters": len(sizes),
    }
    return rewards, metrics
