"""Math answer grading: the last ``\\boxed{}`` answer of a response against a gold answer.

Strict by default: two answers are equal when math-verify proves them equal (exact symbolic or
numeric equivalence: ``1/2 == 0.5 == \\dfrac12``, ``2^{10} == 1024``, ``x+1 == 1+x``, ``007 == 7``).
``lenient=True`` adds the published grader's tolerant numeric comparison (2015 passes for 2016);
it inflates rewards and accuracies, so every report must name the mode.

Bounded time. Answers come from a policy under training and can be anything: ``10^{10^{10}}``,
a 5,000-character formula, 20 levels of nested braces (which alone takes math-verify's LaTeX
parser over a minute). Three layers keep every call bounded, whatever thread it runs on:

1. Caps: an answer longer than ``MAX_ANSWER_CHARS`` or nested deeper than ``MAX_NESTING_DEPTH``
   is compared as a normalized string only; math-verify never sees it.
2. In the main thread, the comparison runs in-process under our own ``ITIMER_REAL`` timer
   (float seconds, one budget for parsing and verifying both answers; math-verify's own timeouts
   are integer seconds per parse and per comparison, so they could add up to several budgets).
   The timer re-fires every ``_ALARM_REPEAT_S`` until disarmed, in case something deep in sympy
   swallows the first interrupt.
3. Off the main thread, signals cannot be used (math-verify's ``parse``/``verify`` raise there
   unless their timeouts are disabled), so the comparison is sent to a small pool of worker
   processes. Each worker runs it in *its* main thread under the same timer, and the caller kills
   the worker by pid if no answer comes back within the budget plus a grace period: that covers
   C-level work a signal cannot interrupt. Workers are plain ``python -c`` subprocesses speaking
   JSON lines on stdin/stdout, so they never re-import the caller's ``__main__`` (unlike
   multiprocessing's spawn) and are never forked from a multi-threaded trainer.

A timeout counts as "not equivalent". Results are cached per normalized pair (TTRL and EMPO
compare the same answers many times), timeouts included, so a pathological pair costs its budget
once per process.

This module is the public API (``is_equivalent``, ``equivalences``, ``grade_responses``,
``compute_score``) and the cache in front of the comparisons. The parts live beside it:
``rewards.answers`` (extraction, normalization, the cheap checks and the caps), ``rewards.comparisons``
(the math-verify jobs under the timer of layer 2) and ``rewards.grading_pool`` (the worker processes
of layer 3); their names stay importable from here.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from collections.abc import Sequence

from tempo_mega.rewards.answers import (
    LENIENT_REL_TOL,
    LENIENT_ROUND_DECIMALS,
    MAX_ANSWER_CHARS,
    MAX_NESTING_DEPTH,
    _fast_verdict,
    extract_answer,
    normalize_answer,
)
from tempo_mega.rewards.comparisons import MAX_POWER_DIGITS, _alarm_available, _run_with_alarm
from tempo_mega.rewards.grading_pool import (
    _POOL,
    _WorkerPool,  # noqa: F401 - kept importable from here
    _WorkerUnavailable,
    default_grading_workers,
    start_grading_workers,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LENIENT_REL_TOL",
    "LENIENT_ROUND_DECIMALS",
    "MAX_ANSWER_CHARS",
    "MAX_NESTING_DEPTH",
    "MAX_POWER_DIGITS",
    "compute_score",
    "default_grading_workers",
    "equivalences",
    "extract_answer",
    "grade_responses",
    "is_equivalent",
    "normalize_answer",
    "start_grading_workers",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0
"""Budget for one comparison (parse both answers + verify). Typical answers take < 0.1 s."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _compare_cached(job: str, pred: str, gold: str, timeout_s: float) -> bool:
    if _alarm_available():
        return _run_with_alarm(job, pred, gold, timeout_s)
    return _POOL.compare(job, pred, gold, timeout_s)  # may raise _WorkerUnavailable: not cached


_warned_unavailable = False


def _compare(job: str, pred: str, gold: str, timeout_s: float) -> bool:
    global _warned_unavailable
    try:
        return _compare_cached(job, pred, gold, float(timeout_s))
    except (_WorkerUnavailable, OSError) as e:
        if not _warned_unavailable:
            _warned_unavailable = True
            logger.warning(
                "math grading off the main thread is unavailable (%s): such comparisons count as "
                "not equivalent; call from the main thread or fix the worker",
                e,
            )
        return False


def is_equivalent(
    pred: str, gold: str, *, lenient: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
) -> bool:
    """Whether the answer ``pred`` equals the answer ``gold`` (both bare answers, not responses).

    Strict (default): normalized strings are equal, or both are plain integers with the same value
    (``007 == 7``, exact for any size), or math-verify proves them equivalent (fractions vs
    decimals, ``\\dfrac``, ``\\left(``, powers, symbolic expressions, sets and intervals,
    ``1,000 == 1000``, units in ``\\text{}`` and ``\\%``, as far as math-verify tolerates them).

    ``lenient=True``: strict, or both evaluate to finite real numbers within ``LENIENT_REL_TOL``
    (2e-3) relative tolerance after rounding to ``LENIENT_ROUND_DECIMALS`` decimals, like the
    published verl-fork grader's tolerant numeric path: 2015 passes for 2016, 0.3333 for 1/3.
    Lenient inflates scores; reports must name the mode. (Unlike verl's ``prime_math.math_equal``,
    it does not also accept gold*100 or gold/100 as a percentage.)

    Empty answers are never equivalent. Bounded by ``timeout_s`` per comparison in any thread
    (module docstring); a timeout counts as not equivalent. Never raises.
    """
    try:
        fast = _fast_verdict(pred, gold, lenient)
        if fast is not None:
            return fast
        p, g = normalize_answer(pred), normalize_answer(gold)
        if _compare("strict", p, g, timeout_s):
            return True
        return lenient and _compare("lenient_numeric", p, g, timeout_s)
    except Exception:  # never let grading take the trainer down
        logger.debug("is_equivalent failed", exc_info=True)
        return False


def equivalences(
    pairs: Sequence[tuple[str, str]], *, lenient: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int = 1,
) -> list[bool]:
    """``is_equivalent(pred, gold)`` for every ``(pred, gold)`` of ``pairs``, each distinct normalized
    pair decided once. The cheap checks run here; with ``workers > 1`` the pairs math-verify must decide
    go to that many grading worker processes at once (each comparison under its own time bound, a
    worker that overruns is killed: module docstring), else they run one by one in this process.
    The verdicts are those of ``is_equivalent`` either way (timeouts aside); they are cached, so a
    later ``is_equivalent`` of the same pair costs nothing. Never raises."""
    verdicts: dict[tuple[str, str], bool] = {}
    slow: list[tuple[str, str]] = []
    for pred, gold in pairs:
        key = (pred, gold)
        if key in verdicts:
            continue
        try:
            fast = _fast_verdict(pred, gold, lenient)
        except Exception:
            fast = False
        if fast is None:
            verdicts[key] = False  # placeholder, decided below
            slow.append(key)
        else:
            verdicts[key] = fast
    if slow:
        def decide(key: tuple[str, str]) -> bool:
            return is_equivalent(key[0], key[1], lenient=lenient, timeout_s=timeout_s)

        if workers > 1 and len(slow) > 1:
            # each thread hands its comparison to a worker process (off the main thread, see above)
            with concurrent.futures.ThreadPoolExecutor(min(workers, len(slow)), thread_name_prefix="grade") as pool:
                results = list(pool.map(decide, slow))
        else:
            results = [decide(key) for key in slow]
        verdicts.update(zip(slow, results))
    return [verdicts[(pred, gold)] for pred, gold in pairs]


def grade_responses(
    solutions: Sequence[str], ground_truths: Sequence[str | int | float], *, lenient: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S, workers: int = 1,
) -> list[bool]:
    """Whether each solution's last boxed answer equals its ground truth: ``compute_score(s, g) > 0``
    for every pair, with the distinct (answer, gold) pairs decided once and, with ``workers > 1``, in
    parallel worker processes (``equivalences``). Never raises."""
    if len(solutions) != len(ground_truths):
        raise ValueError(f"grade_responses: {len(solutions)} solutions but {len(ground_truths)} ground truths")
    answers = [extract_answer(s) for s in solutions]
    golds = [str(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else g for g in ground_truths]
    index = [i for i, (a, g) in enumerate(zip(answers, golds)) if a is not None and isinstance(g, str)]
    ok = [False] * len(solutions)
    verdicts = equivalences([(answers[i], golds[i]) for i in index], lenient=lenient, timeout_s=timeout_s,
                            workers=workers)
    for i, v in zip(index, verdicts):
        ok[i] = v
    return ok


def compute_score(
    solution: str, ground_truth: str, *, lenient: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S
) -> float:
    """+1.0 if the last boxed answer of ``solution`` equals ``ground_truth``, else -1.0.

    No box, an unbalanced or empty box, or a timeout give -1.0. ``ground_truth`` may be a number
    (as read from a dataset row). Strict unless ``lenient`` (see ``is_equivalent``: lenient inflates
    scores, reports must name the mode). Never raises.
    """
    try:
        if isinstance(ground_truth, (int, float)) and not isinstance(ground_truth, bool):
            ground_truth = str(ground_truth)
        answer = extract_answer(solution)
        if answer is None or not isinstance(ground_truth, str):
            return -1.0
        return 1.0 if is_equivalent(answer, ground_truth, lenient=lenient, timeout_s=timeout_s) else -1.0
    except Exception:
        logger.debug("compute_score failed", exc_info=True)
        return -1.0
