"""The test-time pseudo-rewards of a whole step: every unlabeled group's TTRL or EMPO rewards at once."""

from __future__ import annotations

from collections.abc import Sequence

from tempo_mega.rewards.clusters import prefetch_cluster_pairs
from tempo_mega.rewards.empo import empo_rewards
from tempo_mega.rewards.math import extract_answer
from tempo_mega.rewards.ttrl import ttrl_rewards


def pseudo_rewards(
    mode: str, groups: Sequence[Sequence[str]], *, positive: float = 1.0, negative: float = -1.0,
    workers: int = 1,
) -> list[list[float]]:
    """``ttrl_rewards`` (``mode="ttrl"``) or ``empo_rewards`` (``"empo"``) of each group of responses,
    the same values as calling them group by group. With ``workers > 1`` the answer comparisons of all
    groups are first decided in that many grading processes at once (``prefetch_cluster_pairs``)."""
    if mode not in ("ttrl", "empo"):
        raise ValueError(f"pseudo_rewards: mode must be 'ttrl' or 'empo', got {mode!r}")
    prefetch_cluster_pairs([[extract_answer(s) for s in g] for g in groups], workers=workers)
    if mode == "ttrl":
        return [ttrl_rewards(g, positive=positive, negative=negative)[0] for g in groups]
    return [empo_rewards(g)[0] for g in groups]
