"""Generate calls run in the background while the trainer computes (``rollout.async_steps=1``).

``start_generate(rollout, calls)`` runs ``calls`` ((prompt ids, n, sampling) each) one after another on a
thread and returns at once; ``finish_generate(rollout, handle)`` waits for them and returns (samples,
metrics) per call, or raises the first error. An engine with its own ``start_generate`` /
``finish_generate`` (``NodeGroupRollout``: only the engine-owning ranks sample in the background, the
collectives that hand the samples to every rank run in ``finish_generate``, on the caller's thread) is
used through them; any other engine's ``generate`` runs on the thread as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

Call = tuple[Sequence[Sequence[int]], int, Any]  # (prompt ids, n, SamplingParams)


class Background:
    """``fn(call)`` for each call in order, on a daemon thread; ``result()`` joins it."""

    def __init__(self, fn: Callable[[Call], Any], calls: Sequence[Call]):
        self.results: list = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, list(calls)), name="rollout-async", daemon=True)
        self._thread.start()

    def _run(self, fn, calls) -> None:
        try:
            for call in calls:
                self.results.append(fn(call))
        except BaseException as e:  # raised on the caller's thread by result()
            self.error = e

    def result(self) -> list:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.results


def start_generate(rollout, calls: Sequence[Call]):
    if hasattr(rollout, "start_generate"):
        return rollout.start_generate(calls)
    return Background(lambda call: rollout.generate(*call), calls)


def finish_generate(rollout, handle) -> list[tuple[list, dict[str, float]]]:
    if hasattr(rollout, "finish_generate"):
        return rollout.finish_generate(handle)
    return handle.result()
