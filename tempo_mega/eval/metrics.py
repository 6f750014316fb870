"""Evaluation metrics: avg@k, pass@k, answer diversity, and reward-drift monitors.

Tables of correctness are ``[P, n]``: one row per prompt (problem), one column per sample. They may
be numpy arrays, torch tensors or nested lists of bools (or 0/1); rows of nested lists may differ in
length, in which case every per-prompt quantity uses that row's own n.

The reward-drift monitors (``auroc``, ``expected_calibration_error``) compare a label-free reward
(TTRL majority vote, EMPO semantic entropy, the critic's value) against ground truth on labeled
rows: AUROC says whether the reward still ranks correct answers above wrong ones, ECE whether its
scale still means a probability of being correct.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) in log space (``-expm1(sum log1p(-k/i))``), so it
    keeps relative precision when the result is close to 0 and never forms the huge binomials; it
    agrees with exact rational arithmetic to ~1e-15 for n up to a few thousand.
    """
    n = _as_int(n, "n")
    c = _as_int(c, "c")
    k = _as_int(k, "k")
    if n < 0:
        raise ValueError(f"n (number of samples) must be >= 0, got {n}")
    if c < 0:
        raise ValueError(f"c (number of correct samples) must be >= 0, got {c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if c > n:
        raise ValueError(f"c (number of correct samples) = {c} exceeds n (number of samples) = {n}")
    if k > n:
        raise ValueError(f"k = {k} exceeds n (number of samples) = {n}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    log_all_wrong = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_all_wrong)


def _correct_rows(correct: Any) -> list[np.ndarray]:
    """Rows of a ``[P, n]`` correctness table as 1-D bool arrays; checks values are 0/1."""
    if hasattr(correct, "detach"):  # torch tensor, without importing torch
        correct = correct.detach().cpu().numpy()
    if isinstance(correct, np.ndarray):
        if correct.ndim != 2:
            raise ValueError(f"correct must be a [P, n] table, got shape {tuple(correct.shape)}")
        rows = list(correct)
    else:
        rows = [np.asarray(row) for row in correct]
        for p, row in enumerate(rows):
            if row.ndim != 1:
                raise ValueError(f"correct[{p}] must be a 1-D row of bools, got shape {tuple(row.shape)}")
    if not rows:
        raise ValueError("correct is empty: need at least one prompt")
    out = []
    for p, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"correct[{p}] is empty: need at least one sample per prompt")
        if row.dtype != np.bool_:
            if not np.all((row == 0) | (row == 1)):
                raise ValueError(
                    f"correct[{p}] must hold bools or 0/1, got values {np.unique(row)[:5].tolist()} "
                    "(pass correctness, not +-1 rewards)"
                )
            row = row.astype(bool)
        out.append(row)
    return out


def avg_at_k(correct: Any) -> float:
    """avg@k: mean over prompts of the fraction of correct samples. ``correct``: [P, n] bool."""
    return float(np.mean([row.mean() for row in _correct_rows(correct)]))


def pass_at_k_batch(correct: Any, k: int) -> float:
    """Mean over prompts of ``pass_at_k(n, c_p, k)``. ``correct``: [P, n] bool."""
    rows = _correct_rows(correct)
    return float(np.mean([pass_at_k(row.size, int(row.sum()), k) for row in rows]))


def _num_distinct(answers: Sequence[str | None], equivalent: Callable[[str, str], bool] | None) -> int:
    present = [a for a in answers if a is not None]
    if equivalent is None:
        return len(set(present))
    # Greedy clustering against one representative per class (the first answer seen in it); with a
    # non-transitive `equivalent` the count depends on sample order, as any single-pass grouping would.
    representatives: list[str] = []
    for answer in present:
        if not any(equivalent(rep, answer) for rep in representatives):
            representatives.append(answer)
    return len(representatives)


def _check_answer_table(answers: Sequence[Sequence[str | None]]) -> None:
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError("answers must be a non-empty [P, n] table of final answers (str or None)")
    for p, row in enumerate(answers):
        if isinstance(row, str):
            raise ValueError(f"answers[{p}] is a string; expected a row of n answers")
        if len(row) == 0:
            raise ValueError(f"answers[{p}] is empty: need at least one sample per prompt")


def distinct_answers(
    answers: Sequence[Sequence[str | None]],
    equivalent: Callable[[str, str], bool] | None = None,
) -> float:
    """Mean over prompts of the number of distinct final answers; ``None`` (no answer) is not counted.

    ``answers``: [P, n] final answers. ``equivalent(a, b)``: group answers by this relation instead
    of string equality (e.g. the math verifier, so "1/2" and "0.5" count once).
    """
    _check_answer_table(answers)
    return float(np.mean([_num_distinct(row, equivalent) for row in answers]))


def distinct_answer_ratio(
    answers: Sequence[Sequence[str | None]],
    equivalent: Callable[[str, str], bool] | None = None,
) -> float:
    """Mean over prompts of (distinct answers) / n, n counting every sample including ``None``."""
    _check_answer_table(answers)
    return float(np.mean([_num_distinct(row, equivalent) / len(row) for row in answers]))


def _as_1d_float(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

    The Mann-Whitney U statistic over average ranks, O(N log N). NaN when only one class is present.
    """
    s = _as_1d_float(scores, "scores")
    y = _as_1d_float(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be bools or 0/1")
    positive = y == 1
    num_pos = int(positive.sum())
    num_neg = s.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    # 1-based average rank of each tie group: (first + last) / 2 over the group's sorted positions.
    _, group_start, group_size = np.unique(sorted_scores, return_index=True, return_counts=True)
    group_rank = group_start + (group_size + 1) / 2.0
    ranks = np.empty_like(s)
    ranks[order] = np.repeat(group_rank, group_size)
    u = ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))


def expected_calibration_error(probs: Sequence[float], labels: Sequence[bool], num_bins: int = 10) -> float:
    """ECE over ``num_bins`` equal-width bins of [0, 1], each weighted by its share of samples.

    Bin b holds probs in [b/B, (b+1)/B) (the last bin also holds 1.0). NaN for empty input.
    """
    num_bins = _as_int(num_bins, "num_bins")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    p = _as_1d_float(probs, "probs")
    y = _as_1d_float(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"probs and labels differ in length: {p.size} vs {y.size}")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError("probs must lie in [0, 1] (map rewards with reward_to_prob first)")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be bools or 0/1")
    if p.size == 0:
        return float("nan")
    bins = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    prob_sum = np.bincount(bins, weights=p, minlength=num_bins)
    label_sum = np.bincount(bins, weights=y, minlength=num_bins)
    # sum_b (n_b / N) |mean(y_b) - mean(p_b)| = sum_b |sum(y_b) - sum(p_b)| / N
    return float(np.abs(label_sum - prob_sum).sum() / p.size)


def reward_to_prob(reward: Any, low: float = -1.0, high: float = 1.0) -> Any:
    """Map a reward on [low, high] (default +-1) linearly to [0, 1], clipping values outside.

    A float gives a float; a torch tensor gives a tensor; anything else array-like gives a numpy array.
    """
    if not high > low:
        raise ValueError(f"high must exceed low, got low={low}, high={high}")
    if hasattr(reward, "detach"):
        return ((reward - low) / (high - low)).clamp(0.0, 1.0)
    prob = np.clip((np.asarray(reward, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return float(prob) if prob.ndim == 0 else prob
