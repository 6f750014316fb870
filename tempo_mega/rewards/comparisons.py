"""The math-verify comparisons of two normalized answers, each bounded in time wherever it runs.

Two jobs (``_JOBS``): ``strict`` (math-verify proves the answers equivalent) and ``lenient_numeric``
(both are finite reals within ``LENIENT_REL_TOL``); an answer holding a power or factorial too big to
evaluate (``MAX_POWER_DIGITS``) is never handed to sympy. ``_run_with_alarm`` runs a job in the main
thread under our own ``ITIMER_REAL`` timer, one budget for parsing and verifying both answers; off the
main thread the same call runs in a grading worker's main thread (``tempo_mega.rewards.grading_pool``).
A timeout or an error counts as "not equivalent". The layers and why they exist: the docstring of
``tempo_mega.rewards.math``.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from tempo_mega.rewards.answers import _lenient_close

logger = logging.getLogger(__name__)

_ALARM_REPEAT_S = 0.05

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


class _TimeoutFilter(logging.Filter):
    """Drops math-verify's one-time "Timeout is disabled" warning: we pass ``None`` on purpose and
    bound the time ourselves (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_TimeoutFilter())


# --------------------------------------------------------------------------------------------
# The comparisons themselves (run under a time budget, in this process or in a worker)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _parse(answer: str) -> list:
    # Wrapped in $...$ so math-verify reads the whole answer as LaTeX (with \boxed{} it would
    # lose "50\%", which it reads as 50 between dollars). Timeouts are ours (module docstring).
    return parse("$" + answer + "$", extraction_config=_EXTRACTION_CONFIG, parsing_timeout=None)


MAX_POWER_DIGITS = 10_000
"""A parsed answer holding a power or a factorial of numbers with more digits than this
(``10^{10^{10}}``, ``1000000!``) is compared as a string only: sympy would try to evaluate it and use
up the whole time budget on every comparison it takes part in."""


def _huge_power(parsed: list) -> bool:
    """Whether a parsed answer contains ``a^b`` with numeric a, b or ``n!`` with numeric n whose value
    has more than MAX_POWER_DIGITS digits."""
    for item in parsed:
        if not isinstance(item, sympy.Basic):
            continue
        for node in sympy.preorder_traversal(item):
            if isinstance(node, sympy.factorial) and node.args[0].is_number:
                try:
                    n = _magnitude(node.args[0])
                except (TypeError, ValueError, OverflowError):
                    return True
                if n > 10 and n * math.log10(n / math.e) > MAX_POWER_DIGITS:
                    return True
                continue
            if not isinstance(node, sympy.Pow):
                continue
            base, exp = node.args
            if not (base.is_number and exp.is_number):
                continue
            try:
                e = _magnitude(exp)
                b = _magnitude(base)
                if b > 1 and e * math.log10(b) > MAX_POWER_DIGITS:
                    return True
            except (TypeError, ValueError, OverflowError):
                return True  # a power whose exponent cannot even be sized
    return False


def _magnitude(x: sympy.Basic) -> float:
    """|x| as a float without evaluating big powers (nested towers are sized recursively)."""
    if isinstance(x, sympy.Pow) and x.args[0].is_number and x.args[1].is_number:
        b, e = abs(_magnitude(x.args[0])), _magnitude(x.args[1])
        if b > 1 and e * math.log10(b) > 300:
            raise OverflowError
        return float(b ** e)
    return abs(float(sympy.N(x, 15)))


def _strict_job(pred: str, gold: str) -> bool:
    g, p = _parse(gold), _parse(pred)
    if _huge_power(g) or _huge_power(p):
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _real_value(parsed: list) -> sympy.Float | None:
    """The first parsed item as a finite real number (``x = 3`` gives 3), or None."""
    for item in parsed:
        if isinstance(item, str):
            continue
        expr = item
        if isinstance(expr, sympy.Eq) and expr.lhs.is_Symbol:
            expr = expr.rhs
        if not isinstance(expr, sympy.Expr) or expr.free_symbols:
            return None
        value = sympy.N(expr, 30)
        if not (value.is_Number and value.is_real and value.is_finite):
            return None
        return sympy.Float(value, 30)
    return None


def _lenient_numeric_job(pred: str, gold: str) -> bool:
    if _huge_power(_parse(pred)) or _huge_power(_parse(gold)):
        return False
    a, b = _real_value(_parse(pred)), _real_value(_parse(gold))
    return a is not None and b is not None and _lenient_close(a, b)


_JOBS: dict[str, Callable[[str, str], bool]] = {
    "strict": _strict_job,
    "lenient_numeric": _lenient_numeric_job,
}


class _ComparisonTimeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that math-verify's and sympy's
    ``except Exception`` blocks let it through."""


def _alarm_available() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) is not None  # None: a C-level handler we could not restore
    )


def _run_with_alarm(job: str, pred: str, gold: str, timeout_s: float) -> bool:
    """Runs ``_JOBS[job]`` in this (main) thread; False on timeout or error. Any previous
    SIGALRM handler and ITIMER_REAL timer are restored afterwards (a shorter pending timer
    shortens our budget so it is not delayed)."""
    armed = True

    def on_alarm(signum, frame):
        if armed:
            raise _ComparisonTimeout

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    budget = min(timeout_s, old_delay) if old_delay > 0 else timeout_s
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, max(budget, 1e-3), _ALARM_REPEAT_S)
            try:
                return _JOBS[job](pred, gold)
            finally:
                armed = False  # from here a late alarm is a no-op
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _ComparisonTimeout:
            logger.debug("%s comparison timed out after %.2f s", job, timeout_s)
            return False
        except Exception:  # math-verify/sympy bugs on odd input: not equivalent
            logger.debug("%s comparison failed", job, exc_info=True)
            return False
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), old_interval)
