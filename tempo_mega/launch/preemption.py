"""Preemption: SLURM's warning signal ends a run at the next step boundary with a checkpoint and a
requeue exit code; a second signal or a grace period ends it at once."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from tempo_mega.checkpoint import (
    latest_checkpoint,
)
from tempo_mega.launch.slurm import REQUEUE_EXIT_CODE  # "checkpointed on a preemption signal: requeue me"

log = logging.getLogger("tempo_mega")




class Preempted(SystemExit):
    """Raised after the checkpoint that follows SIGTERM/SIGUSR1; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, completed_steps: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.completed_steps = completed_steps


class PreemptionWatch:
    """Remembers SIGTERM / SIGUSR1 (SLURM's warning before the time limit) instead of dying mid-step:
    the loop finishes the step, checkpoints and exits with REQUEUE_EXIT_CODE.

    That wait is bounded: a second SIGTERM / SIGUSR1 / SIGINT, or ``grace_s`` (trainer.preempt_grace_s)
    after the first signal, ends the process at once with exit code 128 + the signal's number and a
    message naming the last complete checkpoint under ``checkpoints``: a step or a save that never ends
    (a hung collective, a stuck write) cannot keep a run from stopping. A checkpoint is published only
    once complete (checkpoint.atomic_checkpoint), so ending mid-save leaves the previous one intact; the
    partial directory is cleaned up by the next resume. A first SIGINT keeps Python's KeyboardInterrupt
    (and starts the grace period).

    The signals are counted by a watcher thread woken through ``signal.set_wakeup_fd``, which the
    interpreter writes to the moment a signal arrives, whatever the main thread is blocked in (Python's
    handlers wait for the main thread to run bytecode again, which a hung collective never does)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    ESCALATE = ("SIGTERM", "SIGUSR1", "SIGINT")  # a second one of these ends the process
    # one request often arrives twice: SLURM signals every process of the step and the batch script's trap
    # forwards the same signal through srun and torchrun; signals this soon after the first are that one
    REPEAT_WINDOW_S = 2.0
    EXIT_HANDLERS_TIMEOUT_S = 10.0  # atexit handlers (stopping launched servers) get this long, then we exit

    def __init__(self, grace_s: float | None = None, checkpoints: Path | None = None):
        if grace_s is not None and not grace_s > 0:
            raise ValueError(f"config key 'trainer.preempt_grace_s': must be > 0 seconds, got {grace_s}")
        self.grace_s, self.checkpoints = grace_s, checkpoints
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd: int | None = None
        self._socks: tuple[Any, Any] | None = None
        self._first_at: float | None = None  # when the watcher saw the first signal (monotonic)
        self._first_signal = 0
        self._stopped = False
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> PreemptionWatch:
        import signal
        import socket

        if threading.current_thread() is not threading.main_thread():  # handlers only install there
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # the interpreter's C-level signal handler must never block
        self._socks = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(reader,), name="preemption-watch", daemon=True)
        self._watcher.start()
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signal is None:
            log.warning("received signal %d: checkpointing after the current step, then exiting for requeue "
                        "(a second signal%s ends the run at once)", signum,
                        f", or {self.grace_s:g} s without finishing," if self.grace_s else "")
            self.signal = signum
            if signal.SIGINT not in self._previous:  # from now on SIGINT is the watcher's, not a KeyboardInterrupt
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)

    def _watch(self, reader) -> None:
        """Watcher thread: reads the signal numbers the interpreter writes to the wakeup fd."""
        import select
        import signal
        import time

        escalate = {getattr(signal, n) for n in self.ESCALATE if hasattr(signal, n)}
        while not self._stopped:
            timeout = None
            if self._first_at is not None and self.grace_s is not None:
                timeout = max(0.0, self._first_at + self.grace_s - time.monotonic())
            try:
                ready, _, _ = select.select([reader], [], [], timeout)
            except (OSError, ValueError):  # closed at exit
                return
            if not ready:  # the grace period ran out
                self._force_exit(self._first_signal, f"trainer.preempt_grace_s={self.grace_s:g} s passed since "
                                                      f"signal {self._first_signal} without a checkpoint and exit")
                return
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data or self._stopped:
                return
            now = time.monotonic()
            for signum in data:
                if signum not in escalate:
                    continue
                if self._first_at is None:
                    self._first_at, self._first_signal = now, signum
                elif now - self._first_at >= self.REPEAT_WINDOW_S:
                    self._force_exit(signum, f"a second signal ({signum}, after {self._first_signal})")
                    return

    def _force_exit(self, signum: int, why: str) -> None:
        import atexit
        import os
        import sys

        code = 128 + int(signum)
        last = None
        if self.checkpoints is not None:
            with contextlib.suppress(Exception):
                last = latest_checkpoint(self.checkpoints)
        where = f"the last complete checkpoint is {last}" if last is not None else \
            f"no complete checkpoint under {self.checkpoints}" if self.checkpoints is not None else "no checkpoint dir"
        message = (f"tempo-mega: ending the run now: {why}; the step in flight is lost, {where}; "
                   f"exit code {code}")
        log.error(message)
        with contextlib.suppress(Exception):
            print(message, file=sys.stderr, flush=True)
        # atexit handlers stop what the run launched (e.g. SGLang servers), but may hang themselves
        handlers = threading.Thread(target=atexit._run_exitfuncs, daemon=True)
        handlers.start()
        handlers.join(self.EXIT_HANDLERS_TIMEOUT_S)
        os._exit(code)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._socks is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            self._stopped = True
            with contextlib.suppress(OSError):
                self._socks[1].send(b"\0")  # wakes the watcher, which sees _stopped and returns
            if self._watcher is not None:
                self._watcher.join(1.0)
            for sock in self._socks:
                sock.close()
            self._socks = None
