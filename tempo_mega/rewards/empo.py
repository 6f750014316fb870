"""EMPO reward: each response is rewarded with the share of its semantic cluster in the group."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tempo_mega.rewards.clusters import cluster_answers, cluster_sizes
from tempo_mega.rewards.math import extract_answer


def empo_rewards(solutions: Sequence[str]) -> tuple[list[float], dict]:
    """EMPO rewards for one prompt's group of responses.

    Answers are clustered by equivalence (``cluster_answers``); a response's reward is its
    cluster's size divided by the group size (all responses, answered or not), so it lies in
    (0, 1]. A response without an answer gets 0.0, the lowest reward.

    Returns ``(rewards [len(solutions)], metrics)`` with metrics ``semantic_entropy`` (natural-log
    entropy of the cluster distribution over the answered responses; 0.0 when fewer than two
    clusters) and ``num_clusters``.
    """
    ids = cluster_answers([extract_answer(s) for s in solutions])
    sizes = cluster_sizes(ids)
    n = len(solutions)
    rewards = [sizes[cluster] / n if cluster >= 0 else 0.0 for cluster in ids]
    answered = sum(sizes)
    entropy = sum(s / answered * math.log(answered / s) for s in sizes) if answered else 0.0
    return rewards, {"semantic_entropy": entropy, "num_clusters": len(sizes)}
