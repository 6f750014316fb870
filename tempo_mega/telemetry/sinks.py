"""Metric sinks: where the controller's per-step metrics go (jsonl file, wandb, a progress bar).

Every sink has the same two methods (``MetricSink``); ``MultiSink`` fans one call out to several.
Metric keys are namespaced (``actor/loss``, ``timing/rollout_s``); values are numbers or strings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from tempo_mega.checkpoint import atomic_write_text

__all__ = ["JsonlSink", "MetricSink", "MultiSink", "ProgressSink", "WandbSink"]

logger = logging.getLogger(__name__)

MetricValue = float | int | str


@runtime_checkable
class MetricSink(Protocol):
    def log(self, metrics: dict[str, MetricValue], step: int) -> None: ...

    def close(self) -> None: ...


def _plain_value(key: str, value: Any) -> float | int | str | bool | None:
    """A JSON-ready value: numpy/torch scalars unwrapped, non-finite floats as None (JSON null)."""
    if hasattr(value, "item") and not isinstance(value, str):
        try:
            value = value.item()  # numpy scalar, 0-d array or 1-element tensor
        except (ValueError, RuntimeError):
            raise ValueError(f"metric {key!r} is not a scalar: {value!r}") from None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(f"metric {key!r} has unsupported type {type(value).__name__}: {value!r}")


class JsonlSink:
    """One JSON object per step, ``{"step": step, **metrics}``, appended to a jsonl file.

    ``path`` is the file, or an existing directory in which case the file is ``path/metrics.jsonl``.
    Each line is flushed as it is written (``fsync=True`` also forces it to disk). NaN and +-inf are
    written as ``null``: JSON has no literal for them, and ``null`` keeps the file readable by every
    JSON parser (pandas reads it back as NaN).

    Resuming from the checkpoint of step N, pass ``truncate_after_step=N``: lines with step > N are
    dropped (the run re-runs those steps), as is a final line torn by a crash; the file is rewritten
    atomically.
    """

    def __init__(self, path: str | Path, truncate_after_step: int | None = None, fsync: bool = False):
        path = Path(path)
        if path.is_dir():
            path = path / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fsync = fsync
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")
        if self._file.tell() > 0 and not self._ends_with_newline():
            # A torn last line from a crash: start on a fresh line so later records stay parseable.
            self._file.write("\n")
            self._file.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _truncate(self, last_step: int) -> None:
        if not self.path.exists():
            return
        kept, dropped_bad = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped_bad += 1
                continue
            if isinstance(step, int) and step <= last_step:
                kept.append(line + "\n")
        if dropped_bad:
            logger.warning("%s: dropped %d unparseable line(s) while truncating", self.path, dropped_bad)
        atomic_write_text(self.path, "".join(kept))

    def log(self, metrics: dict[str, MetricValue], step: int) -> None:
        if self._file is None:
            raise ValueError(f"JsonlSink({self.path}) is closed")
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step' (it is passed separately)")
        record = {"step": int(step), **{key: _plain_value(key, value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbSink:
    """Weights & Biases run; offline by default (``WANDB_MODE`` is set to ``mode`` unless already set).

    ``resume_id``: the id of the run to continue (``run_id`` of the earlier sink, saved with the
    checkpoint). wandb ignores steps lower than the run's last logged step, so steps re-run after a
    resume appear once, with their first values.
    """

    def __init__(
        self,
        project: str,
        run_name: str,
        config: Mapping[str, Any],
        directory: str | Path,
        mode: str = "offline",
        resume_id: str | None = None,
    ):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbSink needs wandb: pip install 'tempo-mega[wandb]'") from e
        os.environ.setdefault("WANDB_MODE", mode)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=run_name,
            config=dict(config),
            dir=str(directory),
            mode=os.environ["WANDB_MODE"],
            id=resume_id,
            resume="allow" if resume_id is not None else None,
        )
        self._closed = False

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, MetricValue], step: int) -> None:
        self.run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


class ProgressSink:
    """A tqdm bar on stderr: the step, and the values of ``keys`` present in each step's metrics.

    Keys are shown by their last component (``actor/loss`` -> ``loss``) unless two would collide.
    The bar appears, and its clock starts, at ``restart_clock()`` or the first ``log``, not at
    construction: work done before the first step (a warm start with its own bar, the initial
    evaluation) is not a step, and counted in the rate it made the first ETA read hours
    (``1/40 [02:21<1:31:57]``).
    """

    def __init__(
        self,
        total_steps: int,
        keys: Sequence[str] = ("rollout/score_mean", "actor/loss", "critic/loss", "perf/tokens_per_s"),
        initial_step: int = 0,
        mininterval: float = 1.0,
        disable: bool = False,
        file: IO[str] | None = None,
        desc: str = "step",
    ):
        self.keys = tuple(keys)
        short = [key.rsplit("/", 1)[-1] for key in self.keys]
        self._labels = {key: (name if short.count(name) == 1 else key) for key, name in zip(self.keys, short)}
        self._bar_kwargs = dict(total=total_steps, initial=initial_step, desc=desc,
                                file=file if file is not None else sys.stderr, mininterval=mininterval,
                                disable=disable, dynamic_ncols=True)
        self._bar = None

    @property
    def bar(self):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(**self._bar_kwargs)
        return self._bar

    def restart_clock(self) -> None:
        """Start the bar (elapsed time and rate) from now."""
        if self._bar is None:
            self.bar  # noqa: B018 - creating it starts its clock
        else:
            self._bar.unpause()

    def _postfix(self, metrics: Mapping[str, MetricValue]) -> str:
        parts = []
        for key in self.keys:
            if key in metrics:
                value = metrics[key]
                text = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
                parts.append(f"{self._labels[key]}={text}")
        return " ".join(parts)

    def log(self, metrics: dict[str, MetricValue], step: int) -> None:
        self.bar.set_postfix_str(self._postfix(metrics), refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        else:
            self.bar.n = step
            self.bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class MultiSink:
    """Sends every call to each of ``sinks`` in order. ``close`` closes all of them, then re-raises
    the first error if any failed."""

    def __init__(self, sinks: Iterable[MetricSink]):
        self.sinks = list(sinks)

    def log(self, metrics: dict[str, MetricValue], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        first_error: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # close the others before reporting
                first_error = first_error or e
        if first_error is not None:
            raise first_error
