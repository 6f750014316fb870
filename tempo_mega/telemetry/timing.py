"""Wall time per phase of a step (rollout, reward, critic, actor, weight sync), as ``timing/*_s``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates wall time per named phase until ``reset``::

        timer = PhaseTimer(sync=torch.cuda.synchronize)
        with timer.phase("rollout"):
            ...
        timer.metrics()  # {"timing/rollout_s": 12.3}

    ``sync`` is called before each clock reading, so asynchronous GPU work launched inside a phase is
    charged to it. A phase entered several times accumulates; nested phases each count their full
    span (the outer one includes the inner). With ``nvtx=True`` and CUDA available each phase is also
    an NVTX range, so it shows by name in Nsight Systems; on CPU this is silently skipped.
    ``clock`` (seconds, monotonic) is injectable for tests.
    """

    def __init__(
        self,
        sync: Callable[[], None] | None = None,
        nvtx: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.sync = sync
        self.clock = clock
        self._totals: dict[str, float] = {}
        self._nvtx = None
        if nvtx:
            import torch

            if torch.cuda.is_available():
                self._nvtx = torch.cuda.nvtx

    def _now(self) -> float:
        if self.sync is not None:
            self.sync()
        return self.clock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as ``name``; it counts even when the block raises."""
        if self._nvtx is not None:
            self._nvtx.range_push(name)
        start = self._now()
        try:
            yield
        finally:
            elapsed = self._now() - start
            if self._nvtx is not None:
                self._nvtx.range_pop()
            self._totals[name] = self._totals.get(name, 0.0) + elapsed

    def metrics(self) -> dict[str, float]:
        """``{"timing/<phase>_s": seconds}`` accumulated since construction or the last ``reset``."""
        return {f"timing/{name}_s": total for name, total in self._totals.items()}

    def reset(self) -> None:
        self._totals.clear()
