"""Math grading: answer extraction, strict vs lenient equivalence, bounded time in any thread.

Expected values are written by hand from what each answer means, not from running the grader.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time

import pytest

from tempo_mega.rewards import grading_pool
from tempo_mega.rewards import math as grading
from tempo_mega.rewards.math import compute_score, extract_answer, is_equivalent, normalize_answer

# Generous bounds: a 2-core CI machine under load, plus one worker start-up where noted.
TIMEOUT_S = 1.0
SLACK_S = 1.5
# a comparison sympy cannot finish in any budget here (it evaluates the product); the timeout tests use it
SLOW_ANSWER = "\\prod_{k=1}^{10^{7}} k"

# ---------------------------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------------------------

EXTRACTION_CASES = [
    ("The answer is \\boxed{5}.", "5"),
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    ("\\fbox{3}", "3"),
    ("\\boxed{1} and \\fbox{7}", "7"),
    ("\\boxed{}", ""),
    ("\\boxed{ 12 }", "12"),
    ("\\boxed {5}", "5"),
    ("\\boxed 5", "5"),
    ("so $\\boxed 42$.", "42"),
    ("\\boxed 7.", "7"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\boxed{a}}", "a"),
    ("\\boxed{5", None),
    ("\\boxed{5} and later \\boxed{6", None),  # the last box decides, even when truncated
    ("\\boxed{\\}", None),  # an escaped brace does not close the box
    ("no box here, the answer is 5", None),
    ("\\boxedfoo{3}", None),
    ("\\boxed", None),
    ("", None),
    (None, None),
    (123, None),
]


@pytest.mark.parametrize(("solution", "expected"), EXTRACTION_CASES)
def test_extract_answer(solution, expected):
    assert extract_answer(solution) == expected


def test_extract_answer_is_linear_on_huge_inputs():
    many_open_boxes = "\\boxed{" * 20_000
    garbage = "x{\\}$^" * 20_000
    start = time.monotonic()
    assert extract_answer(many_open_boxes) is None
    assert extract_answer(garbage) is None
    assert extract_answer(garbage + "\\boxed{9}") == "9"
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\dfrac12", "\\frac12"),
        ("$5$", "5"),
        ("\\$5", "\\$5"),
        ("1\\,000", "1000"),
        ("\\pi r", "\\pi r"),  # a space between letters matters
        ("1\\\\ 2", "1\\\\2"),  # a line break is not an escape of the next character
        ("\\leftarrow", "\\leftarrow"),
        ("5.", "5"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------------------------------------
# The grading table: (solution, gold, strict score, lenient score)
# ---------------------------------------------------------------------------------------------

GRADING_TABLE = [
    # extraction
    ("The answer is \\boxed{5}.", "5", 1.0, 1.0),
    ("no box, but the answer is 5", "5", -1.0, -1.0),
    ("\\boxed{3} no wait \\boxed{5}", "5", 1.0, 1.0),
    ("\\boxed{5} no wait \\boxed{3}", "5", -1.0, -1.0),
    ("\\boxed{}", "5", -1.0, -1.0),
    ("\\boxed{}", "", -1.0, -1.0),
    ("\\boxed{.}", ".", -1.0, -1.0),
    ("\\fbox{42}", "42", 1.0, 1.0),
    ("\\boxed 7.", "7", 1.0, 1.0),
    ("\\boxed{\\boxed{5}}", "5", 1.0, 1.0),
    ("\\boxed{\\frac{1}{2}", "1/2", -1.0, -1.0),
    ("\\boxed{5} then a cut-off \\boxed{5", "5", -1.0, -1.0),
    ("", "5", -1.0, -1.0),
    ("\\boxed{5}", "", -1.0, -1.0),
    # fractions, decimals, LaTeX variants
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{\\dfrac12}", "0.5", 1.0, 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0, 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac12", 1.0, 1.0),
    ("\\boxed{1.0}", "1", 1.0, 1.0),
    ("\\boxed{0.333333}", "1/3", 1.0, 1.0),  # math-verify rounds to 6 decimals
    ("\\boxed{0.3333}", "\\frac{1}{3}", -1.0, 1.0),
    ("\\boxed{\\sqrt{2}}", "2^{1/2}", 1.0, 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt{3}", 1.0, 1.0),
    ("\\boxed{0.866}", "\\frac{\\sqrt{3}}{2}", -1.0, 1.0),
    ("\\boxed{\\pi}", "3.14", -1.0, 1.0),
    # powers, symbols, integers
    ("\\boxed{2^{10}}", "1024", 1.0, 1.0),
    ("\\boxed{x+1}", "1+x", 1.0, 1.0),
    ("\\boxed{x+2}", "1+x", -1.0, -1.0),
    ("\\boxed{x=3}", "3", 1.0, 1.0),
    ("\\boxed{007}", "7", 1.0, 1.0),
    ("\\boxed{1,000}", "1000", 1.0, 1.0),
    ("\\boxed{-3}", "3", -1.0, -1.0),
    ("\\boxed{-3}", "-3", 1.0, 1.0),
    ("\\boxed{123456789012345678901234567890}", "123456789012345678901234567890", 1.0, 1.0),
    # 30-digit integers one apart: exact in strict mode, within tolerance in lenient mode
    ("\\boxed{123456789012345678901234567891}", "123456789012345678901234567890", -1.0, 1.0),
    ("\\boxed{2016}", 2016, 1.0, 1.0),  # gold read from a dataset row as an int
    # the lenient tolerance
    ("\\boxed{2015}", "2016", -1.0, 1.0),
    ("\\boxed{-2015}", "-2016", -1.0, 1.0),
    ("\\boxed{2015.5}", "2016", -1.0, 1.0),
    ("\\boxed{x=2015}", "2016", -1.0, 1.0),
    ("\\boxed{2000}", "2016", -1.0, -1.0),
    ("\\boxed{0.0001}", "0", -1.0, -1.0),
    # units, percent, text
    ("\\boxed{5\\text{ cm}}", "5", 1.0, 1.0),
    ("$\\boxed{\\$5}$", "5", 1.0, 1.0),
    ("\\boxed{10\\%}", "10", 1.0, 1.0),
    ("\\boxed{10\\%}", "0.1", -1.0, -1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0, 1.0),
    ("\\boxed{A}", "B", -1.0, -1.0),
    # sets, tuples, intervals
    ("\\boxed{\\{3,4\\}}", "\\{4,3\\}", 1.0, 1.0),
    ("\\boxed{3, 4}", "\\{3,4\\}", 1.0, 1.0),
    ("\\boxed{\\left(1,2\\right)}", "(1,2)", 1.0, 1.0),
    ("\\boxed{[1,2)}", "[1,2)", 1.0, 1.0),
    ("\\boxed{(1,2)}", "[1,2]", -1.0, -1.0),
    ("\\boxed{\\infty}", "\\infty", 1.0, 1.0),
    # pathological: bounded, and never right
    ("\\boxed{10^{10^{10}}}", "5", -1.0, -1.0),
    ("\\boxed{" + "{" * 20 + "1" + "}" * 20 + "}", "1", -1.0, -1.0),
    ("\\boxed{" + "1+" * 2500 + "1}", "2501", -1.0, -1.0),  # over MAX_ANSWER_CHARS: strings only
    ("\\boxed{" + "\\frac{" * 8000, "1", -1.0, -1.0),
]


def test_grading_table_is_large_enough():
    assert len(GRADING_TABLE) >= 40


@pytest.mark.parametrize(("solution", "gold", "strict", "lenient"), GRADING_TABLE)
def test_grading_table(solution, gold, strict, lenient):
    start = time.monotonic()
    assert compute_score(solution, gold, timeout_s=TIMEOUT_S) == strict
    assert compute_score(solution, gold, lenient=True, timeout_s=TIMEOUT_S) == lenient
    # strict + lenient numeric path: at most two budgets (plus slack for the parser's first use)
    assert time.monotonic() - start < 2 * TIMEOUT_S + SLACK_S


def test_lenient_is_a_superset_of_strict():
    for solution, gold, strict, lenient in GRADING_TABLE:
        assert not (strict == 1.0 and lenient == -1.0), (solution, gold)
    assert sum(row[3] > row[2] for row in GRADING_TABLE) >= 5  # and strictly larger


@pytest.mark.parametrize(
    ("a", "b"),
    [("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\dfrac12", "1/2"), ("x+1", "1+x"), ("2^{10}", "1024")],
)
def test_is_equivalent_both_ways(a, b):
    assert is_equivalent(a, b) and is_equivalent(b, a)


def test_is_equivalent_rejects_bad_inputs_without_raising():
    assert not is_equivalent("", "")
    assert not is_equivalent("5", None)  # type: ignore[arg-type]
    assert not is_equivalent(None, "5")  # type: ignore[arg-type]
    assert compute_score(None, "5") == -1.0  # type: ignore[arg-type]
    assert compute_score("\\boxed{5}", None) == -1.0  # type: ignore[arg-type]


def test_garbage_100k_characters_is_bounded():
    garbage = "".join("\\{[(^_$%&}"[i % 10] + "ab1"[i % 3] for i in range(50_000))
    assert len(garbage) == 100_000
    start = time.monotonic()
    assert compute_score(garbage, "5") == -1.0
    assert compute_score("\\boxed{" + garbage + "}", "5", lenient=True) == -1.0
    assert not is_equivalent(garbage, garbage[:-1])
    assert time.monotonic() - start < 1.0  # caps: math-verify never sees it


def test_pathological_answer_times_out_in_budget():
    start = time.monotonic()
    assert not is_equivalent(SLOW_ANSWER, "7", timeout_s=0.3)
    assert time.monotonic() - start < 0.3 + SLACK_S


@pytest.mark.parametrize("answer", ["10^{10^{10}}", "10^{10^{10^{10}}}", "2^{100000}", "1000000!", "(10^{8})!"])
def test_huge_powers_and_factorials_are_compared_as_strings(fresh_cache, answer):
    """Without the cap each of these costs a whole time budget per comparison (sympy evaluates them):
    with it, no budget is spent, whatever the partner."""
    start = time.monotonic()
    assert not is_equivalent(answer, "7", timeout_s=2.0)
    assert not is_equivalent("\\frac{1}{2}", answer, timeout_s=2.0)
    assert is_equivalent(answer, answer)  # the same string still equals itself
    assert time.monotonic() - start < 1.0


def test_moderate_powers_are_still_verified():
    assert is_equivalent("2^{100}", "1267650600228229401496703205376")
    assert is_equivalent("10!", "3628800")
    assert not is_equivalent("2^{100}", "1267650600228229401496703205377")


def test_main_thread_timer_restores_previous_alarm():
    calls = []

    def previous_handler(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGALRM, previous_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert not is_equivalent("9^{9^{9^{9}}}", "3", timeout_s=0.2)
        assert signal.getsignal(signal.SIGALRM) is previous_handler
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert calls == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# Off the main thread
# ---------------------------------------------------------------------------------------------

THREAD_PAIRS = [
    ("\\frac{3}{4}", "0.75", True),
    ("\\dfrac{6}{8}", "3/4", True),
    ("y^2+2y+1", "(y+1)^2", True),
    ("0.76", "\\frac{3}{4}", False),
    ("\\{5,6\\}", "\\{6,5\\}", True),
    ("17", "017", True),
]


@pytest.fixture
def fresh_cache():
    """Results cached by other tests (main thread) would hide the worker path."""
    grading._compare_cached.cache_clear()
    yield
    grading._compare_cached.cache_clear()


def test_is_equivalent_in_a_thread(fresh_cache):
    results = {}

    def work():
        results["pairs"] = [is_equivalent(p, g) for p, g, _ in THREAD_PAIRS]
        start = time.monotonic()
        results["tower"] = is_equivalent(SLOW_ANSWER, "5", timeout_s=0.3)
        results["tower_s"] = time.monotonic() - start
        results["lenient"] = is_equivalent("2.015", "2.016", lenient=True)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert results["pairs"] == [expected for _, _, expected in THREAD_PAIRS]
    assert results["tower"] is False
    assert results["tower_s"] < 0.3 + grading_pool._WORKER_GRACE_S + SLACK_S
    assert results["lenient"] is True


def test_is_equivalent_in_a_thread_pool(fresh_cache):
    pathological = [("9^{9^{9}}", "1", False), ("(10^{10})!", "2", False)]
    pairs = THREAD_PAIRS * 3 + pathological
    timeouts = [grading.DEFAULT_TIMEOUT_S] * len(THREAD_PAIRS) * 3 + [0.5] * len(pathological)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p, t: is_equivalent(p[0], p[1], timeout_s=t), pairs, timeouts))
    assert results == [expected for _, _, expected in pairs]
    assert time.monotonic() - start < 30.0  # worker start-ups included


def test_worker_that_overruns_is_killed(fresh_cache, monkeypatch):
    """A worker stuck beyond the budget (simulated: the caller waits less than the worker's
    own timer) is killed and replaced; the caller gets "not equivalent" in time."""
    box = {}

    def work():
        box["warm"] = is_equivalent("\\frac{1}{4}", "0.25")  # starts a worker
        workers_before = set(grading._POOL._all)
        monkeypatch.setattr(grading_pool, "_WORKER_GRACE_S", -0.9)  # caller deadline: 0.1 s of 1.0
        start = time.monotonic()
        box["stuck"] = is_equivalent(SLOW_ANSWER, "3", timeout_s=1.0)
        box["stuck_s"] = time.monotonic() - start
        box["killed"] = [w.proc.poll() is not None for w in workers_before]
        monkeypatch.setattr(grading_pool, "_WORKER_GRACE_S", 1.0)
        box["after"] = is_equivalent("\\frac{1}{5}", "0.2")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert box["warm"] is True
    assert box["stuck"] is False
    assert box["stuck_s"] < 0.1 + SLACK_S
    assert any(box["killed"])
    assert box["after"] is True


def test_results_are_cached(fresh_cache):
    assert is_equivalent("\\frac{5}{8}", "0.625")
    hits = grading._compare_cached.cache_info().hits
    assert is_equivalent("\\frac{5}{8}", "0.625")
    assert grading._compare_cached.cache_info().hits == hits + 1


def test_dead_idle_worker_is_replaced(fresh_cache):
    box = {}

    def work():
        box["first"] = is_equivalent("\\frac{1}{8}", "0.125")  # leaves an idle worker
        for worker in list(grading._POOL._idle):
            worker.proc.kill()
            worker.proc.wait()
        box["second"] = is_equivalent("\\frac{3}{8}", "0.375")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert box == {"first": True, "second": True}


def test_pool_that_cannot_start_a_worker_fails_fast(monkeypatch):
    pool = grading._WorkerPool(1)
    monkeypatch.setattr(grading_pool.sys, "executable", "/nonexistent/python")
    with pytest.raises(grading._WorkerUnavailable):
        pool.compare("strict", "1", "2", 1.0)
    start = time.monotonic()
    with pytest.raises(grading._WorkerUnavailable, match="failed to start"):
        pool.compare("strict", "1", "2", 1.0)
    assert time.monotonic() - start < 0.1
