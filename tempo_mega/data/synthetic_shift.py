"""The ``shift`` synthetic task (``data.synthetic_task=shift``): a labeled split and an unlabeled split
drawn from different problem mixes, with a precedence trap, meant to let the toy study test the
paper's claims (issue 14). The older ``arith`` task (``synthetic.py``) draws both splits from one mix;
it stays the default of ``data.synthetic_task`` (``experiment=debug_cpu`` and the tests); ``experiment=demo``
and ``scripts/study.py`` use this one.

Families (single-digit operands where a tiny model learns the facts; every step of every solution,
the trap's shortcut included, is a kind of step some family's solutions teach):

=========  ===================================  ==============================================
family     problems                             reference solution (what the warm start learns)
=========  ===================================  ==============================================
``add``    a + b, a in 1..9, b in 10..40        ``5+39=44. \\boxed{44}``
``mul``    a * b, a in 2..30, b in 2..5         ``14*3=42. \\boxed{42}``
``chain``  a+b+c, a+b-c, a-b+c, a-b-c (1..9)    ``7+8=15, 15-5=10. \\boxed{10}`` (left to right is right)
``prec``   a + b * c, a, b in 1..9, c in 2..4   ``6*2=12, 8+12=20. \\boxed{20}`` (the product first)
=========  ===================================  ==============================================

No intermediate or result is negative. Solutions are compact (no spaces) to keep responses short.

The shift. D_L (the "DAPO-Math" side, ``LABELED_MIX``) is mostly routine: chains and one-step facts,
``prec`` 10%. D_u (the "AIME" side, ``UNLABELED_MIX``) is half ``chain``, half ``prec``.

The trap: a misconception planted in the warm start, as a base model brings one from pretraining. Every
``chain`` form is solved left to right, and ``a + b * c`` reads like ``a + b - c`` up to one symbol. In
the warm start's corpus (the reference solutions it trains on), ``PREC_MISCONCEPTION_SHARE`` of D_L's
``prec`` problems are worked left to right, ``a+b=s, s*c=r``, i.e. ``(a + b) * c``: ``meta["trap_answer"]``,
always wrong (``(a+b)c - (a+bc) = a(c-1) > 0`` as c >= 2); the others with the product first. Their
labels stay true: D_L holds every ``prec`` problem WITH its true answer, so RLVR on D_L and a critic
regressed on verified outcomes (TEMPO's E-step) see trap responses fail, while a majority vote on D_u,
where the trap is the most common answer, rewards it.

History: an earlier version gave only a share of D_L's ``prec`` problems a (correct) worked solution and
hoped the model would fall into the left-to-right template by itself. It did not (2-core CPU, demo
model, warm start 1,200 steps): with 10% solved the model learned "a product first" but multiplied the
wrong operands (``8 + 6 * 2`` -> ``8*2=16, ...``): trap answer in 0.036 of samples. ``eval/trap_answer_frac``
and ``eval/trap_majority_frac`` measure the trap on every run; nothing here assumes it formed.

Everything is a function of ``seed``; the two splits never share a problem.
"""

from __future__ import annotations

import random

from tempo_mega.data.datasets import PromptRecord

__all__ = ["LABELED_MIX", "PREC_MISCONCEPTION_SHARE", "SHIFT_FAMILIES", "UNLABELED_MIX", "make_shift_task",
           "shift_solution_text", "steps"]

SHIFT_FAMILIES = ("add", "mul", "chain", "prec")
# share of D_L's prec problems whose warm-start solution is worked left to right (the misconception);
# their labels stay true
PREC_MISCONCEPTION_SHARE = 0.75
# family -> share of the split; counts are allocated exactly (largest remainder), then shuffled
LABELED_MIX: dict[str, float] = {"add": 0.15, "mul": 0.10, "chain": 0.65, "prec": 0.10}
UNLABELED_MIX: dict[str, float] = {"chain": 0.5, "prec": 0.5}
CHAIN_FORMS = ("a+b+c", "a+b-c", "a-b+c", "a-b-c")
_MAX_TRIES = 20_000


def _allocate(mix: dict[str, float], n: int) -> list[str]:
    """n family names with counts proportional to ``mix`` (largest remainder, ties by family order)."""
    total = sum(mix.values())
    exact = {f: n * w / total for f, w in mix.items()}
    counts = {f: int(x) for f, x in exact.items()}
    order = sorted(mix, key=lambda f: -(exact[f] - counts[f]))
    for f in order[: n - sum(counts.values())]:
        counts[f] += 1
    return [f for f in mix for _ in range(counts[f])]


def _draw(family: str, rng: random.Random) -> tuple[str, tuple[int, ...]] | None:
    """(form, operands) for one candidate problem of the family, or None if it breaks a range."""
    r = rng.randint
    if family == "add":
        return "a+b", (r(1, 9), r(10, 40))
    if family == "mul":
        return "a*b", (r(2, 30), r(2, 5))
    if family == "prec":
        return "a+b*c", (r(1, 9), r(1, 9), r(2, 4))
    form = CHAIN_FORMS[r(0, len(CHAIN_FORMS) - 1)]
    a, b, c = r(1, 9), r(1, 9), r(1, 9)
    t = a + b if form[1] == "+" else a - b
    if t < 0 or (form[3] == "-" and c > t):  # no negative intermediate or result
        return None
    return form, (a, b, c)


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def steps(form: str, operands: tuple[int, ...] | list[int], left_to_right: bool = False) -> list[tuple[int, str, int, int]]:
    """The solution's steps as (x, op, y, result). Two-step forms follow precedence (the product first)
    unless ``left_to_right``, which is the trap's shortcut."""
    ops = [ch for ch in form if ch in "+-*"]
    if len(ops) == 1:
        a, b = operands
        return [(a, ops[0], b, _apply(ops[0], a, b))]
    a, b, c = operands
    if ops[1] == "*" and ops[0] != "*" and not left_to_right:  # a + b * c: the product first
        t = b * c
        return [(b, "*", c, t), (a, ops[0], t, _apply(ops[0], a, t))]
    t = _apply(ops[0], a, b)
    return [(a, ops[0], b, t), (t, ops[1], c, _apply(ops[1], t, c))]


def _prompt(form: str, operands: tuple[int, ...]) -> str:
    letters = dict(zip("abc", operands))
    return "What is " + " ".join(str(letters[ch]) if ch in letters else ch for ch in form) + "?"


def make_shift_task(num_train: int, num_test: int, seed: int = 0) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """A labeled split from ``LABELED_MIX`` (``answer`` set) and an unlabeled split from ``UNLABELED_MIX``
    (``answer=None``, the truth in ``hidden_answer``), disjoint, a function of ``seed`` alone.

    ``meta = {"family", "form", "operands", "trap_answer", "task": "shift"}``; ``trap_answer`` is the
    left-to-right answer ``(a + b) * c`` on ``prec`` problems and None elsewhere.
    """
    if num_train < 0 or num_test < 0:
        raise ValueError(f"make_shift_task: split sizes must be >= 0, got {num_train} and {num_test}")
    rng = random.Random(seed)
    seen: set[tuple[str, tuple[int, ...]]] = set()

    def make_split(split: str, n: int, mix: dict[str, float]) -> list[PromptRecord]:
        plan = _allocate(mix, n)
        rng.shuffle(plan)
        n_misconceived = round(PREC_MISCONCEPTION_SHARE * plan.count("prec")) if split == "train" else 0
        records = []
        for i, family in enumerate(plan):
            for _ in range(_MAX_TRIES):
                drawn = _draw(family, rng)
                if drawn is None:
                    continue
                form, ops = drawn
                # a + b and b + a (a * b and b * a) are one problem
                key = (form, tuple(sorted(ops)) if form in ("a+b", "a*b") else ops)
                if key not in seen:
                    seen.add(key)
                    break
            else:
                raise ValueError(f"make_shift_task: ran out of distinct '{family}' problems after {len(seen)}; "
                                 "ask for fewer")
            result = str(steps(form, ops)[-1][3])
            # the first PREC_MISCONCEPTION_SHARE of the labeled prec problems (in shuffled order) are worked
            # left to right in the warm start's corpus; unlabeled ones are never trained on with a solution
            left_to_right = family == "prec" and n_misconceived > 0
            n_misconceived -= left_to_right
            trap = str(steps(form, ops, left_to_right=True)[-1][3]) if family == "prec" else None
            records.append(PromptRecord(
                prompt=_prompt(form, ops),
                answer=result if split == "train" else None,
                source=f"synthetic:{split}:{i}",
                uid=f"synthetic/{split}/{i}",
                hidden_answer=None if split == "train" else result,
                meta={"family": family, "form": form, "operands": list(ops), "trap_answer": trap, "task": "shift",
                      "warm_start_left_to_right": left_to_right},
            ))
        return records

    train = make_split("train", num_train, LABELED_MIX)
    test = make_split("test", num_test, UNLABELED_MIX)
    return train, test


def shift_solution_text(record: PromptRecord) -> str:
    """``"4*3=12, 5+12=17. \\boxed{17}"``: compact (no spaces) so responses stay short on a CPU. The warm
    start's text: a misconceived ``prec`` record is worked left to right, to its trap answer."""
    meta = record.meta
    worked = steps(meta["form"], meta["operands"], left_to_right=bool(meta.get("warm_start_left_to_right")))
    return ", ".join(f"{x}{op}{y}={r}" for x, op, y, r in worked) + f". \\boxed{{{worked[-1][3]}}}"
