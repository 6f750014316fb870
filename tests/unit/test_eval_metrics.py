"""avg@k, pass@k, diversity and reward-drift metrics, each checked against a reference computed
another way (exact rationals, brute-force enumeration, pair counting, hand-worked tables)."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from tempo_mega.eval import (
    auroc,
    avg_at_k,
    distinct_answer_ratio,
    distinct_answers,
    expected_calibration_error,
    pass_at_k,
    pass_at_k_batch,
    reward_to_prob,
)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


# ---------------------------------------------------------------------------------------------- pass@k


def _grid():
    rng = random.Random(0)
    cases = set()
    for n in (1, 2, 3, 7, 16, 64, 100, 255, 512, 1000, 1023, 1024):
        for c in {0, 1, 2, n // 3, n // 2, n - 1, n} | {rng.randint(0, n) for _ in range(4)}:
            for k in {1, 2, 16, n // 4, n // 2, n - c, n - c + 1, n} | {rng.randint(1, n) for _ in range(4)}:
                if 0 <= c <= n and 1 <= k <= n:
                    cases.add((n, c, k))
    return sorted(cases)


GRID = _grid()


def test_pass_at_k_matches_exact_rationals_up_to_n_1024():
    assert len(GRID) > 500
    worst = max(abs(pass_at_k(n, c, k) - float(exact_pass_at_k(n, c, k))) for n, c, k in GRID)
    assert worst < 1e-12


def test_pass_at_k_keeps_relative_precision_near_zero():
    # 1 correct out of 1024, k = 1: exactly 1/1024; and a tiny value well below 1e-12
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024, rel=1e-14)
    exact = exact_pass_at_k(1024, 1, 1)
    assert pass_at_k(1024, 1, 1) == pytest.approx(float(exact), rel=1e-14)
    for n, c, k in [(1024, 1, 2), (1024, 3, 1), (1000, 2, 5)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pass_at_k_matches_subset_enumeration(n):
    # pass@k = fraction of k-subsets of the n samples containing at least one correct sample
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-14), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(16, 0, 1) == 0.0
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 10, 7) == 1.0  # n - c = 6 < k: every 7-subset holds a correct sample
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # pass@1 is the plain accuracy
    assert pass_at_k(np.int64(8), np.int32(2), 3) == pytest.approx(float(exact_pass_at_k(8, 2, 3)))


@pytest.mark.parametrize(
    ("n", "c", "k", "name"),
    [
        (4, 1, 5, "k"),
        (4, 5, 1, "c"),
        (-1, 0, 1, "n"),
        (4, -1, 1, "c"),
        (4, 1, 0, "k"),
        (4, 1, -2, "k"),
        (4.0, 1, 1, "n"),
        (4, 1, 1.5, "k"),
        (True, 1, 1, "n"),
    ],
)
def test_pass_at_k_invalid_arguments_name_the_argument(n, c, k, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------- tables

TABLE = [
    [1, 0, 0, 0],  # 1 of 4
    [1, 1, 1, 1],  # 4 of 4
    [0, 0, 0, 0],  # 0 of 4
    [0, 1, 1, 0],  # 2 of 4
]


@pytest.mark.parametrize(
    "convert",
    [
        lambda t: t,
        lambda t: np.array(t, dtype=bool),
        lambda t: torch.tensor(t, dtype=torch.bool),
        lambda t: np.array(t),
        lambda t: torch.tensor(t),
    ],
    ids=["lists", "numpy-bool", "torch-bool", "numpy-int", "torch-int"],
)
def test_avg_and_pass_at_k_on_hand_computed_table(convert):
    correct = convert(TABLE)
    assert avg_at_k(correct) == pytest.approx((1 / 4 + 1 + 0 + 2 / 4) / 4)
    # pass@1 == avg@k
    assert pass_at_k_batch(correct, 1) == pytest.approx(avg_at_k(correct))
    # pass@2 per row: 1 - C(3,2)/C(4,2) = 1/2; 1; 0; 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k_batch(correct, 2) == pytest.approx((1 / 2 + 1 + 0 + 5 / 6) / 4)
    # pass@4: any correct at all
    assert pass_at_k_batch(correct, 4) == pytest.approx(3 / 4)


def test_ragged_rows_use_their_own_n():
    correct = [[True, False], [True, False, False, False]]
    assert avg_at_k(correct) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert pass_at_k_batch(correct, 2) == pytest.approx((1 + 1 / 2) / 2)


def test_tables_reject_bad_input():
    with pytest.raises(ValueError, match="0/1"):
        avg_at_k([[1, -1, 1]])  # +-1 rewards passed for correctness
    with pytest.raises(ValueError, match="empty"):
        avg_at_k([])
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        avg_at_k(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="^k"):
        pass_at_k_batch(TABLE, 5)


# ------------------------------------------------------------------------------------------ diversity


def test_distinct_answers_by_string_equality():
    answers = [["1", "1", "2", None], ["3", "3", "3", "3"], [None, None, None, None]]
    assert distinct_answers(answers) == pytest.approx((2 + 1 + 0) / 3)
    assert distinct_answer_ratio(answers) == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)


def test_distinct_answers_by_equivalence():
    def same_number(a: str, b: str) -> bool:
        return float(Fraction(a)) == float(Fraction(b))

    answers = [["1/2", "0.5", "2/4", "1"], ["1", "1.0", "2", "3"]]
    assert distinct_answers(answers) == pytest.approx((4 + 4) / 2)  # as plain strings all differ
    assert distinct_answers(answers, equivalent=same_number) == pytest.approx((2 + 3) / 2)
    assert distinct_answer_ratio(answers, equivalent=same_number) == pytest.approx((2 / 4 + 3 / 4) / 2)


def test_distinct_answers_rejects_bad_tables():
    with pytest.raises(ValueError):
        distinct_answers([])
    with pytest.raises(ValueError):
        distinct_answers(["abc"])
    with pytest.raises(ValueError):
        distinct_answer_ratio([[]])


# ------------------------------------------------------------------------------------------- AUROC


def brute_force_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    assert auroc([1.0, -1.0, 1.0], [True, False, False]) == pytest.approx(0.75)


def test_auroc_single_class_is_nan():
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(auroc([], []))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    size = 200
    # few distinct values, so ties are common (like +-1 rewards or majority-vote fractions)
    scores = rng.integers(0, 7, size=size) / 6
    labels = rng.random(size) < 0.3 + 0.4 * scores
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels), abs=1e-12)
    assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
        brute_force_auroc(scores, labels), abs=1e-12
    )


def test_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        auroc([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan"), 0.2], [True, False])
    with pytest.raises(ValueError, match="labels"):
        auroc([0.1, 0.2], [2, 0])


# --------------------------------------------------------------------------------------------- ECE


def test_ece_hand_computed():
    # 4 bins of width 0.25:
    #   bin 0: p = 0.1, 0.2   labels 0, 1  -> |0.5 - 0.15| = 0.35, weight 2/6
    #   bin 2: p = 0.6        label 1      -> |1 - 0.6|   = 0.40, weight 1/6
    #   bin 3: p = 0.9, 1.0, 0.8 labels 1, 1, 0 -> |2/3 - 0.9| = 0.2333.., weight 3/6
    probs = [0.1, 0.2, 0.6, 0.9, 1.0, 0.8]
    labels = [0, 1, 1, 1, 1, 0]
    expected = 2 / 6 * 0.35 + 1 / 6 * 0.40 + 3 / 6 * abs(2 / 3 - 0.9)
    assert expected_calibration_error(probs, labels, num_bins=4) == pytest.approx(expected, abs=1e-12)


def test_ece_perfect_and_worst():
    assert expected_calibration_error([1.0, 0.0, 1.0], [True, False, True]) == 0.0
    assert expected_calibration_error([0.0, 1.0], [True, False]) == 1.0
    # a calibrated 0.75 bin: 3 of 4 correct
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-12)


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error([0.5], [True], num_bins=0)
    assert math.isnan(expected_calibration_error([], []))


def test_reward_to_prob():
    assert reward_to_prob(1.0) == 1.0
    assert reward_to_prob(-1.0) == 0.0
    assert reward_to_prob(0.0) == 0.5
    assert reward_to_prob(3.0) == 1.0 and reward_to_prob(-7.0) == 0.0
    assert reward_to_prob(0.5, low=0.0, high=2.0) == 0.25
    np.testing.assert_allclose(reward_to_prob([-2.0, -1.0, 0.5, 2.0]), [0.0, 0.0, 0.75, 1.0])
    out = reward_to_prob(torch.tensor([-1.0, 0.0, 1.0, 5.0]))
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="high"):
        reward_to_prob(0.0, low=1.0, high=1.0)
