"""TTRL majority vote and EMPO semantic-cluster rewards against hand-computed groups."""

from __future__ import annotations

import concurrent.futures
import math

import pytest

from tempo_mega.rewards import cluster_answers, cluster_sizes, empo_rewards, ttrl_rewards


def boxed(answer: str) -> str:
    return f"Reasoning... so the answer is \\boxed{{{answer}}}."


HALF_GROUP = [boxed("1/2"), boxed("0.5"), boxed("3"), "no answer"]


# ---------------------------------------------------------------------------------------------
# cluster_answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        (["1/2", None, "0.5", "3", "", "\\frac{1}{2}", "3"], [0, -1, 0, 1, -1, 0, 1]),
        (["7", "007", " 7 ", "$7$", "8"], [0, 0, 0, 0, 1]),
        (["x+1", "1+x", "x-1"], [0, 0, 1]),
        (["2015", "2016"], [0, 1]),  # clustering is strict: no numeric tolerance
        ([None, "", "  ", "$$"], [-1, -1, -1, -1]),
        ([], []),
    ],
)
def test_cluster_answers(answers, expected):
    assert cluster_answers(answers) == expected


def test_cluster_sizes():
    assert cluster_sizes([0, -1, 0, 1, -1, 0, 1]) == [3, 2]
    assert cluster_sizes([-1, -1]) == []
    assert cluster_sizes([]) == []


# ---------------------------------------------------------------------------------------------
# TTRL
# ---------------------------------------------------------------------------------------------


def test_ttrl_majority_by_equivalence():
    rewards, metrics = ttrl_rewards(HALF_GROUP)
    assert rewards == [1.0, 1.0, -1.0, -1.0]
    assert metrics == {"majority_share": 0.5, "majority_answer": "1/2", "num_clusters": 2}


def test_ttrl_equivalence_beats_string_counting():
    # By strings "3" wins 2 to 1; by meaning the 1/2 cluster wins 3 to 2.
    group = [boxed("\\frac{1}{2}"), boxed("3"), boxed("3"), boxed("0.5"), boxed("\\dfrac12")]
    rewards, metrics = ttrl_rewards(group)
    assert rewards == [1.0, -1.0, -1.0, 1.0, 1.0]
    assert metrics["majority_share"] == pytest.approx(3 / 5)
    assert metrics["majority_answer"] == "\\frac{1}{2}"
    assert metrics["num_clusters"] == 2


def test_ttrl_tie_goes_to_first_seen_cluster():
    group = [boxed("4"), boxed("3"), boxed("3"), boxed("4")]
    rewards, metrics = ttrl_rewards(group)
    assert rewards == [1.0, -1.0, -1.0, 1.0]
    assert metrics["majority_answer"] == "4"
    assert metrics["majority_share"] == 0.5


def test_ttrl_unanswered_never_form_the_majority():
    group = ["I give up", "no idea", boxed(""), "\\boxed{5", boxed("5")]
    rewards, metrics = ttrl_rewards(group)
    assert rewards == [-1.0, -1.0, -1.0, -1.0, 1.0]
    assert metrics == {"majority_share": 0.2, "majority_answer": "5", "num_clusters": 1}


def test_ttrl_no_answers_at_all():
    rewards, metrics = ttrl_rewards(["a", "b", boxed("")], positive=1.0, negative=0.0)
    assert rewards == [0.0, 0.0, 0.0]
    assert metrics == {"majority_share": 0.0, "majority_answer": None, "num_clusters": 0}


def test_ttrl_custom_reward_values():
    rewards, _ = ttrl_rewards(HALF_GROUP, positive=1.0, negative=0.0)
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_ttrl_empty_group():
    assert ttrl_rewards([]) == ([], {"majority_share": 0.0, "majority_answer": None, "num_clusters": 0})


# ---------------------------------------------------------------------------------------------
# EMPO
# ---------------------------------------------------------------------------------------------


def entropy(counts):
    """Reference: Shannon entropy (nats) of the distribution given by counts."""
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts)


def test_empo_half_group():
    rewards, metrics = empo_rewards(HALF_GROUP)
    assert rewards == [0.5, 0.5, 0.25, 0.0]
    assert metrics["num_clusters"] == 2
    # over the three answered responses: 2/3 and 1/3
    assert metrics["semantic_entropy"] == pytest.approx(
        -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    )


def test_empo_group_of_eight():
    group = [boxed("12")] * 3 + [boxed("012"), boxed("13"), boxed("13"), boxed("14"), "none"]
    rewards, metrics = empo_rewards(group)
    assert rewards == [0.5] * 4 + [0.25, 0.25, 0.125, 0.0]
    assert metrics["num_clusters"] == 3
    assert metrics["semantic_entropy"] == pytest.approx(entropy([4, 2, 1]))


def test_empo_entropy_extremes():
    _, all_same = empo_rewards([boxed("5")] * 4)
    assert all_same == {"semantic_entropy": 0.0, "num_clusters": 1}
    rewards, all_different = empo_rewards([boxed(str(k)) for k in range(4)])
    assert rewards == [0.25] * 4
    assert all_different["semantic_entropy"] == pytest.approx(math.log(4))
    rewards, none = empo_rewards(["x", "y"])
    assert rewards == [0.0, 0.0]
    assert none == {"semantic_entropy": 0.0, "num_clusters": 0}


def test_empo_unanswered_get_the_lowest_reward():
    group = [boxed("1"), boxed("2"), boxed("3"), "no answer"]
    rewards, _ = empo_rewards(group)
    assert min(rewards) == rewards[3] == 0.0
    assert all(r > 0.0 for r in rewards[:3])


def test_rewards_from_worker_threads_match_main_thread():
    groups = [HALF_GROUP, [boxed("\\sqrt{4}"), boxed("2"), boxed("2.5"), boxed("5/2"), boxed("5/2")]]
    expected = [(ttrl_rewards(g), empo_rewards(g)) for g in groups]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(lambda g: (ttrl_rewards(g), empo_rewards(g)), groups))
    assert got == expected
    # and by hand for the second group: {sqrt 4, 2} and {2.5, 5/2, 5/2}
    (rewards, metrics), _ = got[1]
    assert rewards == [-1.0, -1.0, 1.0, 1.0, 1.0]
    assert metrics["majority_answer"] == "2.5"


def test_cluster_answers_compares_at_most_n_times_k(monkeypatch):
    """Each new answer is compared with the representatives in order until one matches, and an answer
    already seen (once normalized) is not compared again: here 7 answers in 3 clusters cost exactly
    these 7 comparisons (the documented bound is n * k = 21)."""
    import tempo_mega.rewards.clusters as clusters_mod

    calls = []

    def same_letter(answer, representative):  # a counting equivalence: same first letter
        calls.append((answer, representative))
        return answer[0] == representative[0]

    monkeypatch.setattr(clusters_mod, "is_equivalent", same_letter)
    answers = ["a1", "a2", "b1", None, "a3", "b2", "c1", "a1"]
    assert cluster_answers(answers) == [0, 0, 1, -1, 0, 1, 2, 0]
    assert calls == [("a2", "a1"), ("b1", "a1"), ("a3", "a1"), ("b2", "a1"), ("b2", "b1"),
                     ("c1", "a1"), ("c1", "b1")]
    assert len(calls) <= len(answers) * 3
