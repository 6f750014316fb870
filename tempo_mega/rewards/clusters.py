"""Answer clusters by equivalence: the one grouping used by TTRL's majority vote and EMPO's
semantic entropy."""

from __future__ import annotations

from collections.abc import Sequence

from tempo_mega.rewards.math import equivalences, is_equivalent, normalize_answer


def cluster_answers(answers: Sequence[str | None]) -> list[int]:
    """Cluster id per answer: ``-1`` for no answer (None, or empty once normalized: ``""``,
    ``"$$"``), else ``0, 1, ...`` in order of first appearance.

    Greedy and deterministic: each answer joins the first existing cluster whose representative
    (its first member) it is equivalent to (``is_equivalent(answer, representative)``, strict),
    else it starts a new cluster. Answers identical once normalized skip the comparison. Each
    comparison is bounded in time (see ``tempo_mega.rewards.math``) and cached; a group of n
    answers in k clusters costs at most n * k of them.
    """
    ids: list[int] = []
    representatives: list[str] = []
    by_string: dict[str, int] = {}
    for answer in answers:
        key = normalize_answer(answer) if isinstance(answer, str) else ""
        if not key:
            ids.append(-1)
            continue
        cluster = by_string.get(key)
        if cluster is None:
            cluster = next(
                (k for k, rep in enumerate(representatives) if is_equivalent(answer, rep)),
                len(representatives),
            )
            if cluster == len(representatives):
                representatives.append(answer)
            by_string[key] = cluster
        ids.append(cluster)
    return ids


def cluster_sizes(ids: Sequence[int]) -> list[int]:
    """Members per cluster id ``0..max(ids)`` (no-answer ids ``-1`` are not counted)."""
    sizes = [0] * (max(ids, default=-1) + 1)
    for cluster in ids:
        if cluster >= 0:
            sizes[cluster] += 1
    return sizes


def prefetch_cluster_pairs(groups: Sequence[Sequence[str | None]], *, workers: int) -> None:
    """Decide, ``workers`` at a time, every comparison ``cluster_answers`` may make on these groups of
    answers: each distinct answer against each distinct earlier one of its group (a superset of the
    greedy's n * k). The verdicts land in the grader's cache, so the clustering that follows (in any
    order, on any thread) makes no slow comparison of its own. With ``workers <= 1`` nothing is done."""
    if workers <= 1:
        return
    pairs: list[tuple[str, str]] = []
    for answers in groups:
        seen: dict[str, str] = {}
        for answer in answers:
            key = normalize_answer(answer) if isinstance(answer, str) else ""
            if key and key not in seen:
                pairs.extend((answer, earlier) for earlier in seen.values())
                seen[key] = answer
    equivalences(pairs, workers=workers)
