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
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import json
import logging
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0
"""Budget for one comparison (parse both answers + verify). Typical answers take < 0.1 s."""

MAX_ANSWER_CHARS = 1000
"""Longer answers are compared as strings only (math-verify's parse time grows with length)."""

MAX_NESTING_DEPTH = 12
"""Deeper ``{([`` nesting is compared as strings only (parse time is exponential in brace depth)."""

LENIENT_REL_TOL = 2e-3
"""Relative tolerance of the lenient numeric comparison (the published grader's ~2e-3)."""

LENIENT_ROUND_DECIMALS = 6
"""Both values are rounded to this many decimals before the lenient comparison (math-verify's
``float_rounding``); it acts as an absolute tolerance of 5e-7 near zero."""

_ALARM_REPEAT_S = 0.05
_WORKER_GRACE_S = 1.0
_WORKER_STARTUP_TIMEOUT_S = 120.0
_MAX_WORKERS = max(1, min(8, os.cpu_count() or 1))

_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


class _TimeoutFilter(logging.Filter):
    """Drops math-verify's one-time "Timeout is disabled" warning: we pass ``None`` on purpose and
    bound the time ourselves (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_TimeoutFilter())


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_TOKEN_RE = re.compile(r"[ \t]+([^\s${}]+)")


def _braced_content(text: str, open_idx: int) -> str | None:
    """Content of the brace group opening at ``text[open_idx] == "{"``, or None if unbalanced.

    A backslash escapes the next character, so ``\\{``/``\\}`` do not count as group braces.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def extract_answer(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` of ``solution``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``). ``\\boxed 5`` (a
    space and one token, as many graders accept) gives ``5``, without trailing ``.,;``. The last
    box decides: if its braces never close (a truncated response), the result is None even when an
    earlier box is complete. An empty box gives ``""``, which never grades as correct. No box, or
    a non-string argument, gives None. Never raises; linear in ``len(solution)``.
    """
    if not isinstance(solution, str):
        return None
    last = None
    for last in _BOX_RE.finditer(solution):  # noqa: B007 - only the last match is wanted
        pass
    if last is None:
        return None
    rest = last.end()
    brace = rest
    while brace < len(solution) and solution[brace] in " \t":
        brace += 1
    if brace < len(solution) and solution[brace] == "{":
        content = _braced_content(solution, brace)
        return None if content is None else content.strip()
    token = _BOX_TOKEN_RE.match(solution, rest)
    if token is None:
        return None
    return token.group(1).rstrip(".,;:") or None


# --------------------------------------------------------------------------------------------
# Normalization and cheap checks
# --------------------------------------------------------------------------------------------

# Scanned left to right so that "\\\\" (a LaTeX line break) is one token and never read as an
# escape of the character after it.
_ESCAPE_OR_SPACING_RE = re.compile(r"\\\\|\\\$|\$|\\[,;:! ]")
_LEFT_RIGHT_DOT_RE = re.compile(r"\\(?:left|right)\.")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC_VARIANT_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SPACE_RE = re.compile(r"\s+")
# A space matters only between two letters ("\pi r", "a b"); elsewhere LaTeX ignores it.
_INSIGNIFICANT_SPACE_RE = re.compile(r"(?<![A-Za-z]) | (?![A-Za-z])")
_PLAIN_INT_RE = re.compile(r"[+-]?[0-9]+")


def _drop_dollar_or_spacing(match: re.Match) -> str:
    token = match.group(0)
    if token in ("\\\\", "\\$"):  # line break, escaped dollar: kept
        return token
    return "" if token == "$" else " "  # math-mode delimiter: dropped; thin space: a space


def normalize_answer(answer: str) -> str:
    """Meaning-preserving cleanup used as the fast-path key, the cache key, and math-verify's input:
    no ``$``, no ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, no thin spaces, no
    insignificant whitespace, no trailing period."""
    s = _ESCAPE_OR_SPACING_RE.sub(_drop_dollar_or_spacing, answer)
    s = _LEFT_RIGHT_DOT_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _FRAC_VARIANT_RE.sub(r"\\frac", s)
    s = _SPACE_RE.sub(" ", s).strip()
    s = _INSIGNIFICANT_SPACE_RE.sub("", s)
    return s.rstrip(".")


def _nesting_depth(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return deepest


def _too_complex(s: str) -> bool:
    return len(s) > MAX_ANSWER_CHARS or _nesting_depth(s) > MAX_NESTING_DEPTH


def _lenient_close(a: Any, b: Any) -> bool:
    """|a - b| <= LENIENT_REL_TOL * max(|a|, |b|) after rounding both to LENIENT_ROUND_DECIMALS.

    Works on ints/Fractions (exact) and sympy Floats alike."""
    a, b = round(a, LENIENT_ROUND_DECIMALS), round(b, LENIENT_ROUND_DECIMALS)
    tol = Fraction(LENIENT_REL_TOL) if isinstance(a, (int, Fraction)) else LENIENT_REL_TOL
    return bool(abs(a - b) <= tol * max(abs(a), abs(b)))


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


# --------------------------------------------------------------------------------------------
# Worker processes for callers off the main thread
# --------------------------------------------------------------------------------------------


class _WorkerUnavailable(Exception):
    """The worker could not be started or died: not a verdict, so never cached."""


class _Worker:
    """One ``python -c`` subprocess running ``_worker_main``: a JSON request per line in, a JSON
    answer per line out."""

    def __init__(self) -> None:
        # Appended, not prepended: an installed tempo_mega wins, a source checkout still works.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), package_root) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tempo_mega.rewards.math import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the trainer does not kill workers mid-request
        )
        self._buffer = b""
        try:
            if self._read_line(time.monotonic() + _WORKER_STARTUP_TIMEOUT_S) != {"ready": True}:
                raise _WorkerUnavailable("unexpected greeting")
        except BaseException:
            self.kill()
            raise

    def _read_line(self, deadline: float) -> Any:
        """The next JSON line from the worker; TimeoutError past ``deadline``."""
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    raise TimeoutError
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise _WorkerUnavailable(f"worker exited with code {self.proc.poll()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def compare(self, job: str, pred: str, gold: str, timeout_s: float) -> bool:
        request = {"job": job, "pred": pred, "gold": gold, "timeout_s": timeout_s}
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:
            raise _WorkerUnavailable(str(e)) from e
        return bool(self._read_line(time.monotonic() + timeout_s + _WORKER_GRACE_S)["result"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class _WorkerPool:
    """Up to ``max_workers`` workers, started on first use and reused; a worker that overruns its
    budget is killed and replaced. If a worker cannot even start, the pool stays broken (every
    call raises ``_WorkerUnavailable`` at once) rather than paying a failed start per comparison."""

    def __init__(self, max_workers: int) -> None:
        self._max = max_workers
        self._slots = threading.BoundedSemaphore(max_workers)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._broken: str | None = None
        atexit.register(self.close)

    def _start_worker(self) -> _Worker:
        if self._broken is not None:
            raise _WorkerUnavailable(self._broken)
        try:
            worker = _Worker()
        except (_WorkerUnavailable, OSError) as e:
            self._broken = f"a grading worker failed to start: {e!r}"
            raise _WorkerUnavailable(self._broken) from e
        with self._lock:
            self._all.add(worker)
        return worker

    def compare(self, job: str, pred: str, gold: str, timeout_s: float) -> bool:
        with self._slots:
            with self._lock:
                worker = self._idle.pop() if self._idle else None
            for attempt in range(2):  # an idle worker may have died since its last job: one retry
                worker = worker if worker is not None else self._start_worker()
                try:
                    result = worker.compare(job, pred, gold, timeout_s)
                except TimeoutError:
                    logger.debug("%s comparison overran %.2f s in a worker; killing it", job, timeout_s)
                    self._discard(worker)
                    return False
                except _WorkerUnavailable:
                    self._discard(worker)
                    if attempt == 1:
                        raise
                    worker = None
                    continue
                except BaseException:
                    self._discard(worker)
                    raise
                with self._lock:
                    self._idle.append(worker)
                return result
        raise AssertionError("unreachable")

    def warm(self, count: int) -> int:
        """Start up to ``count`` workers at once (each imports math-verify and sympy: about a second)
        so that the first step's grading does not pay for it; returns how many are idle now."""
        with self._lock:
            missing = max(0, min(count, self._max) - len(self._all))
        started: list[_Worker] = []

        def start() -> None:
            try:
                started.append(self._start_worker())
            except _WorkerUnavailable:
                pass

        threads = [threading.Thread(target=start, daemon=True) for _ in range(missing)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._lock:
            self._idle.extend(started)
            return len(self._idle)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def close(self) -> None:
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for worker in workers:
            worker.kill()


_POOL = _WorkerPool(_MAX_WORKERS)


def _worker_main() -> None:
    """Worker process loop: answers requests until stdin closes."""
    # Keep the protocol channel private: stray prints from libraries go to stderr instead.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        result = _run_with_alarm(request["job"], request["pred"], request["gold"], request["timeout_s"])
        out.write(json.dumps({"result": result}) + "\n")


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


def _fast_verdict(pred: str, gold: str, lenient: bool) -> bool | None:
    """The verdict of the cheap checks (strings, plain integers, the caps), or None when math-verify
    must decide."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if _PLAIN_INT_RE.fullmatch(p) and _PLAIN_INT_RE.fullmatch(g):
        a, b = int(p), int(g)
        return a == b or (lenient and _lenient_close(a, b))
    if _too_complex(p) or _too_complex(g):
        return False
    return None


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


def start_grading_workers(count: int) -> int:
    """Start ``count`` grading worker processes now (at most the pool's size) instead of at the first
    parallel grading; returns how many are idle. ``count <= 1`` starts none (grading stays in-process)."""
    return _POOL.warm(count) if count > 1 else 0


def default_grading_workers() -> int:
    """Grading processes per trainer process: the cores of this node shared among the node's
    processes (``LOCAL_WORLD_SIZE``, set by torchrun), at most the pool's size, at least 1."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(_MAX_WORKERS, (os.cpu_count() or 1) // max(1, local)))


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
