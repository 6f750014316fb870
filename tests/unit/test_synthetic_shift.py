"""The shift synthetic task: labeled and unlabeled splits from different mixes, and the precedence trap."""

import re
from collections import Counter

import pytest

from tempo_mega.config import load_config
from tempo_mega.data.synthetic import solution_text
from tempo_mega.data.synthetic_shift import (
    LABELED_MIX,
    PREC_MISCONCEPTION_SHARE,
    UNLABELED_MIX,
    make_shift_task,
    steps,
)
from tempo_mega.rewards import compute_score

PROMPT = re.compile(r"What is (\d+) ([-+*]) (\d+)(?: ([-+*]) (\d+))?\?")


def _python_value(prompt: str) -> int:
    """Python's own precedence on the prompt (digits and + - * only, checked by the regex)."""
    m = PROMPT.fullmatch(prompt)
    assert m, prompt
    return eval(" ".join(g for g in m.groups() if g is not None))


def test_shift_deterministic_and_seeded():
    assert make_shift_task(300, 60, seed=5) == make_shift_task(300, 60, seed=5)
    other = make_shift_task(300, 60, seed=6)
    assert [r.prompt for r in make_shift_task(300, 60, seed=5)[0]] != [r.prompt for r in other[0]]


def test_shift_split_mixes_are_as_designed():
    train, test = make_shift_task(1000, 96, seed=1234)
    assert not any(r.meta["warm_start_left_to_right"] for r in test)
    train_counts, test_counts = Counter(r.meta["family"] for r in train), Counter(r.meta["family"] for r in test)
    assert train_counts == {f: round(1000 * w) for f, w in LABELED_MIX.items()}
    assert test_counts == {f: round(96 * w) for f, w in UNLABELED_MIX.items()}
    # the shift: D_u is all two-step; the one-step families exist only in D_L, prec is rare there
    assert set(test_counts) == {"chain", "prec"} and {"add", "mul"} <= set(train_counts)
    assert train_counts["prec"] / len(train) == 0.1 and test_counts["prec"] / len(test) == 0.5


def test_shift_splits_disjoint_and_labeled_as_designed():
    train, test = make_shift_task(1000, 200, seed=0)
    keys = lambda split: {r.prompt for r in split}  # noqa: E731
    assert len(keys(train)) == 1000 and len(keys(test)) == 200 and not keys(train) & keys(test)
    assert all(r.answer is not None and r.hidden_answer is None and r.is_labeled for r in train)
    assert all(r.answer is None and r.hidden_answer is not None and not r.is_labeled for r in test)
    for r in train + test:
        assert r.eval_answer == str(_python_value(r.prompt)) and int(r.eval_answer) >= 0


def test_shift_trap_answer_is_left_to_right_and_always_wrong():
    train, test = make_shift_task(1000, 200, seed=3)
    prec = [r for r in train + test if r.meta["family"] == "prec"]
    assert prec and all(r.meta["form"] == "a+b*c" for r in prec)
    for r in train + test:
        if r.meta["family"] != "prec":
            assert r.meta["trap_answer"] is None
            continue
        a, b, c = r.meta["operands"]
        assert r.meta["trap_answer"] == str((a + b) * c) != r.eval_answer == str(a + b * c)
    assert steps("a+b*c", [5, 4, 3]) == [(4, "*", 3, 12), (5, "+", 12, 17)]
    assert steps("a+b*c", [5, 4, 3], left_to_right=True) == [(5, "+", 4, 9), (9, "*", 3, 27)]
    # in every chain form left to right IS the precedence order (the template the trap copies)
    for r in train:
        if r.meta["family"] == "chain":
            assert steps(r.meta["form"], r.meta["operands"]) == steps(r.meta["form"], r.meta["operands"], True)


def test_shift_reference_solutions_grade_correct_but_the_misconception():
    """The warm start's corpus: every solution grades correct against its (true) label, except the
    misconceived prec ones, worked left to right to the trap answer, a share PREC_MISCONCEPTION_SHARE of
    D_L's prec problems."""
    train, _ = make_shift_task(1000, 0, seed=2)
    prec = [r for r in train if r.meta["family"] == "prec"]
    wrong = [r for r in prec if r.meta["warm_start_left_to_right"]]
    assert len(wrong) == round(PREC_MISCONCEPTION_SHARE * len(prec)) and 0 < len(wrong) < len(prec)
    assert not any(r.meta["warm_start_left_to_right"] for r in train if r.meta["family"] != "prec")
    for r in train:
        text = solution_text(r)
        a_trap = r.meta["warm_start_left_to_right"]
        assert (compute_score(text, r.answer) > 0) != a_trap, text
        if a_trap:
            assert compute_score(text, r.meta["trap_answer"]) > 0, text
    right = next(r for r in prec if not r.meta["warm_start_left_to_right"])
    a, b, c = right.meta["operands"]
    assert solution_text(right).startswith(f"{b}*{c}={b * c}, {a}+{b * c}=")
    a, b, c = wrong[0].meta["operands"]
    assert solution_text(wrong[0]).startswith(f"{a}+{b}={a + b}, {a + b}*{c}=")


def test_shift_is_the_demos_task_and_arith_stays_the_default():
    assert load_config(["experiment=debug_cpu"]).data.synthetic_task == "arith"
    assert load_config(["experiment=demo"]).data.synthetic_task == "shift"
    with pytest.raises(ValueError, match="data.synthetic_task"):
        load_config(["experiment=debug_cpu", "data.synthetic_task=nope"])
