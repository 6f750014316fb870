"""A built-in verifiable math task, so a whole TEMPO run needs no external data.

Problems are short integer arithmetic questions (``What is 47 + 38?``) in five families:

====================  =============================================  ==========================================
family                problems                                       tempting wrong answer (``meta["trap_answer"]``)
====================  =============================================  ==========================================
``add``               a + b, no carry between columns (*)            none
``add_carry``         a + b, a carry between columns                 the carries dropped: 47 + 38 -> 75
``sub``               a - b, a > b, no borrow in any column          none
``sub_borrow``        a - b, a > b, at least one borrow              the borrows ignored: 83 - 47 -> 46
``mul``               a * b with b in 2..9                           none
====================  =============================================  ==========================================

(*) the leading column may reach 10 or more and is written whole: 62 + 46 = 108 is an ``add`` problem.

Why two trap families: a model that writes the answer left to right, one column at a time, must foresee
the carries and borrows coming from the columns to the right. A weak model that learned column-wise
arithmetic from the easy families therefore answers carry/borrow problems *consistently* wrong (each
column mod 10, the leading column whole), so a majority-vote (TTRL) pseudo-label on them is confidently
wrong and reinforces the mistake, while a verifier-grounded critic (TEMPO's E-step, trained on labeled
carries) can push back. The trap answer always differs from the true one: dropping carries lowers the
sum by 10^(i+1) per carrying column i, ignoring borrows raises the difference likewise.

Operand ranges by ``difficulty``: small 1..40 (what a tiny CPU model learns in a minute), easy 1..99, medium 10..99, hard 10..999 (the multiplier b of ``mul`` is
always 2..9). Each split cycles through the families (balanced counts) in a seeded shuffled order;
train and test never share a problem (a + b and b + a count as one). Everything is a function of
``seed``. The answer is the integer result, so a reference solution is one short line:
``47 + 38 = 85. \\boxed{85}``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from tempo_mega.data.datasets import PromptRecord, write_jsonl

__all__ = [
    "DIFFICULTIES",
    "FAMILIES",
    "TASKS",
    "TRAP_FAMILIES",
    "make_synthetic_task",
    "solution_text",
    "write_jsonl",
]

Difficulty = Literal["small", "easy", "medium", "hard"]
FAMILIES = ("add", "add_carry", "sub", "sub_borrow", "mul")
TRAP_FAMILIES = ("add_carry", "sub_borrow")
DIFFICULTIES: dict[str, tuple[int, int]] = {"small": (1, 40), "easy": (1, 99), "medium": (10, 99), "hard": (10, 999)}
_OPS = {"add": "+", "add_carry": "+", "sub": "-", "sub_borrow": "-", "mul": "*"}
# data.synthetic_task: "arith" (this module: both splits from one mix) | "shift" (synthetic_shift.py:
# labeled and unlabeled splits from different mixes, with a precedence trap)
TASKS = ("arith", "shift")
_MAX_TRIES = 20_000  # consecutive rejected draws before a family counts as exhausted


def _digits(x: int, n: int) -> list[int]:
    """The n lowest decimal digits of x, least significant first."""
    return [(x // 10**i) % 10 for i in range(n)]


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    n = max(len(str(a)), len(str(b)))
    return list(zip(_digits(a, n), _digits(b, n)))


def _has_carry(a: int, b: int) -> bool:
    """A carry from one column into the next; the top column may reach 10+ (62 + 46 = 108 has none)."""
    return any(x + y >= 10 for x, y in _columns(a, b)[:-1])


def _has_borrow(a: int, b: int) -> bool:
    """For a > b: some column's top digit is smaller than its bottom digit (never the leading column)."""
    return any(x < y for x, y in _columns(a, b))


def _carries_dropped(a: int, b: int) -> int:
    """a + b computed column by column with no carries, the leading column written whole: 47 + 38 -> 75."""
    cols = _columns(a, b)
    top = len(cols) - 1
    return sum((x + y if i == top else (x + y) % 10) * 10**i for i, (x, y) in enumerate(cols))


def _borrows_ignored(a: int, b: int) -> int:
    """a - b computed column by column with no borrows (each column mod 10): 83 - 47 -> 46."""
    cols = _columns(a, b)
    top = len(cols) - 1
    return sum((x - y if i == top else (x - y) % 10) * 10**i for i, (x, y) in enumerate(cols))


def _result(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _draw(family: str, rng: random.Random, lo: int, hi: int) -> tuple[int, int] | None:
    """One candidate (a, b) for the family, or None when the draw does not belong to it."""
    if family == "mul":
        return rng.randint(max(lo, 2), hi), rng.randint(2, 9)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if family in ("add", "add_carry"):
        return (a, b) if _has_carry(a, b) == (family == "add_carry") else None
    a, b = max(a, b), min(a, b)
    if a == b:
        return None
    return (a, b) if _has_borrow(a, b) == (family == "sub_borrow") else None


def _trap_answer(family: str, a: int, b: int) -> str | None:
    if family == "add_carry":
        return str(_carries_dropped(a, b))
    if family == "sub_borrow":
        return str(_borrows_ignored(a, b))
    return None


def make_synthetic_task(
    num_train: int,
    num_test: int,
    seed: int = 0,
    difficulty: Difficulty = "easy",
    families: Sequence[str] = FAMILIES,
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """A labeled train split (``answer`` set) and an unlabeled test split (``answer=None``, the answer in
    ``hidden_answer`` for evaluation only), disjoint, both a function of ``seed`` alone.

    Records: ``prompt="What is 47 + 38?"`` (the template suffix is added by ``format_prompt``),
    ``uid="synthetic/<split>/<i>"``, ``source="synthetic:<split>:<i>"``, and
    ``meta={"family", "op", "operands": [a, b], "trap_answer", "difficulty"}``.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"make_synthetic_task: split sizes must be >= 0, got {num_train} and {num_test}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(
            f"make_synthetic_task: difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}"
        )
    families = tuple(families)
    unknown = [f for f in families if f not in FAMILIES]
    if not families or unknown:
        raise ValueError(
            f"make_synthetic_task: families must be a non-empty subset of {FAMILIES}, got {families}"
        )
    lo, hi = DIFFICULTIES[difficulty]
    rng = random.Random(seed)
    seen: set[tuple[str, int, int]] = set()

    def make_split(split: str, n: int) -> list[PromptRecord]:
        plan = [families[i % len(families)] for i in range(n)]
        rng.shuffle(plan)
        records = []
        for i, family in enumerate(plan):
            op = _OPS[family]
            for _ in range(_MAX_TRIES):
                ab = _draw(family, rng, lo, hi)
                if ab is None:
                    continue
                a, b = ab
                key = (op, min(a, b), max(a, b)) if op in "+*" else (op, a, b)
                if key not in seen:
                    seen.add(key)
                    break
            else:
                raise ValueError(
                    f"make_synthetic_task: ran out of distinct '{family}' problems at difficulty {difficulty!r} "
                    f"after {len(seen)} problems; ask for fewer, or use a harder difficulty"
                )
            result = str(_result(op, a, b))
            records.append(
                PromptRecord(
                    prompt=f"What is {a} {op} {b}?",
                    answer=result if split == "train" else None,
                    source=f"synthetic:{split}:{i}",
                    uid=f"synthetic/{split}/{i}",
                    hidden_answer=None if split == "train" else result,
                    meta={
                        "family": family,
                        "op": op,
                        "operands": [a, b],
                        "trap_answer": _trap_answer(family, a, b),
                        "difficulty": difficulty,
                    },
                )
            )
        return records

    train = make_split("train", num_train)
    test = make_split("test", num_test)
    return train, test


def solution_text(record: PromptRecord) -> str:
    """A short reference solution for a synthetic record, for a supervised warm start:
    ``"47 + 38 = 85. \\boxed{85}"``."""
    meta = record.meta
    if meta.get("task") == "shift":
        from tempo_mega.data.synthetic_shift import shift_solution_text

        return shift_solution_text(record)
    if not {"op", "operands"} <= set(meta):
        raise ValueError(
            f"solution_text: {record.source} is not a synthetic record (no 'op'/'operands' in meta)"
        )
    a, b = meta["operands"]
    result = _result(meta["op"], a, b)
    return f"{a} {meta['op']} {b} = {result}. \\boxed{{{result}}}"
