"""The grading worker processes: math-verify comparisons for callers off the main thread.

Signals work in the main thread only, so a comparison asked for in any other thread is sent to a small
pool of worker processes (``_POOL``). Each worker runs it in *its* main thread under the same timer as
in-process comparisons (``tempo_mega.rewards.comparisons._run_with_alarm``), and the caller kills the
worker by pid if no answer comes back within the budget plus ``_WORKER_GRACE_S``: that covers C-level
work a signal cannot interrupt. Workers are plain ``python -c`` subprocesses running ``_worker_main``,
speaking JSON lines on stdin/stdout, so they never re-import the caller's ``__main__`` (unlike
multiprocessing's spawn) and are never forked from a multi-threaded trainer. ``start_grading_workers``
starts them ahead of the first parallel grading; ``default_grading_workers`` sizes the pool per process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from typing import Any

from tempo_mega.rewards.comparisons import _run_with_alarm

logger = logging.getLogger(__name__)

_WORKER_GRACE_S = 1.0
_WORKER_STARTUP_TIMEOUT_S = 120.0
_MAX_WORKERS = max(1, min(8, os.cpu_count() or 1))


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
            [sys.executable, "-c", "from tempo_mega.rewards.grading_pool import _worker_main; _worker_main()"],
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


def start_grading_workers(count: int) -> int:
    """Start ``count`` grading worker processes now (at most the pool's size) instead of at the first
    parallel grading; returns how many are idle. ``count <= 1`` starts none (grading stays in-process)."""
    return _POOL.warm(count) if count > 1 else 0


def default_grading_workers() -> int:
    """Grading processes per trainer process: the cores of this node shared among the node's
    processes (``LOCAL_WORLD_SIZE``, set by torchrun), at most the pool's size, at least 1."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(_MAX_WORKERS, (os.cpu_count() or 1) // max(1, local)))

