"""Saving a megatron dist-checkpoint so that a failed write is an error, never a hang.

megatron-core's ``torch_dist`` save hands its write buckets to ``FileSystemWriterAsync``, which writes
them in forked processes (0.16) or threads (0.17+) and waits for them on a ``JoinableQueue`` /
``queue.Queue`` ``join()``. A worker that dies before it marks its task done (0.16's workers import
psutil first and die without it; a killed process; a thread ended by a ``BaseException``) leaves that
``join()`` waiting forever, and the run with it.

``save_sharded`` runs megatron's own strategy (planning, file layout, metadata, the cross-rank failure
check) and replaces only the function that writes the buckets: ``write_buckets_checked`` writes each
bucket in a thread of this process with megatron's own per-bucket writer and joins the threads; any
exception of a worker, ``BaseException`` included, becomes that rank's write result. megatron's
finalization then gathers the results of every rank and raises on all of them, so every rank leaves
the save with an error (``DistCheckpointWriteError``, naming the directory) instead of waiting in the
next collective.
"""

from __future__ import annotations

import logging
import queue
import threading
from functools import partial
from pathlib import Path
from typing import Any

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from torch.distributed.checkpoint import CheckpointException

log = logging.getLogger(__name__)


class DistCheckpointWriteError(RuntimeError):
    """A dist-checkpoint was not written completely; the directory is not a checkpoint."""


def write_buckets_checked(checkpoint_dir: str, transform_list: list, use_msc: bool, rank: int,
                          write_buckets: list, results_queue: queue.Queue) -> None:
    """Write ``write_buckets`` (megatron's ``WriteBucket``s: one file each) in one thread per bucket and
    put ``{bucket index: [WriteResult]}`` into ``results_queue``, or a ``DistCheckpointWriteError``
    naming the directory, the rank, the file and the worker's error when any bucket failed.

    Each worker runs ``FileSystemWriterAsync.write_preloaded_data`` (megatron's file format and fsync)
    given a result queue and a count queue that already holds its token, so it never blocks on them.
    The threads are joined, not a queue: a worker that ends without a result is seen as such."""
    results: queue.Queue = queue.Queue()
    count: queue.Queue = queue.Queue()
    errors: dict[int, BaseException] = {}

    def work(index: int, bucket: Any) -> None:
        try:
            count.put(index)  # write_preloaded_data takes one token and marks it done when it ends
            kwargs: dict[str, Any] = {"local_proc_idx": index, "write_bucket": bucket, "results_queue": results,
                                      "count_queue": count, "use_fsync": True}
            if use_msc:
                kwargs["use_msc"] = True
            FileSystemWriterAsync.write_preloaded_data(transform_list, **kwargs)
        except BaseException as e:  # noqa: BLE001 - a worker's end of any kind is this rank's write result
            errors[index] = e

    threads = [threading.Thread(target=work, args=(i, b), name=f"dist-ckpt-writer-{i}", daemon=True)
               for i, b in enumerate(write_buckets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written: dict[int, list] = {}
    while True:
        try:
            index, outcome = results.get_nowait()
        except queue.Empty:
            break
        if isinstance(outcome, BaseException):
            errors.setdefault(index, outcome)
        else:
            written[index] = outcome
    for index in range(len(write_buckets)):
        if index not in written and index not in errors:
            errors[index] = RuntimeError("the worker ended without a result")
    if errors:
        parts = [f"{write_buckets[i][1]}: {type(e).__name__}: {e}" for i, e in sorted(errors.items())]
        message = f"dist-checkpoint {checkpoint_dir}, rank {rank}: writing failed ({'; '.join(parts)})"
        log.error(message)
        results_queue.put(DistCheckpointWriteError(message))
    else:
        results_queue.put(written)


class CheckedTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's ``torch_dist`` save strategy (same format, loaded by the default strategy), whose
    buckets are written by ``write_buckets_checked``; the write results go through a queue of this
    process rather than the writer's (a multiprocessing Manager's)."""

    def __init__(self) -> None:
        super().__init__("torch_dist", 1)

    def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret, *args, **kwargs):
        request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret, *args, **kwargs)
        if request.async_fn is None:  # nothing to write on this rank
            return request
        rank, buckets, _ = request.async_fn_args
        own: queue.Queue = queue.Queue()
        writer.results_queue = own  # retrieve_write_results reads it in the finalization
        transforms = [writer.transforms] if hasattr(writer, "transforms") else []
        fn = partial(write_buckets_checked, str(writer.checkpoint_dir), transforms, bool(getattr(writer, "use_msc", False)))
        return request._replace(async_fn=fn, async_fn_args=[rank, buckets, own])


def save_sharded(sharded_state_dict: dict[str, Any], directory: str | Path) -> None:
    """``dist_checkpointing.save`` with ``CheckedTorchDistSaveStrategy``. A collective. Raises
    ``DistCheckpointWriteError`` naming ``directory`` on every rank when any rank's write failed;
    ``ImportError`` before writing anything when psutil (which megatron's writer uses) is missing."""
    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        raise ImportError(f"saving the dist-checkpoint {directory}: megatron-core's checkpoint writer needs psutil, "
                          f"which is not installed (pip install psutil, or the 'megatron' extra of tempo-mega)")
    try:
        dist_checkpointing.save(sharded_state_dict, str(directory), sharded_strategy=CheckedTorchDistSaveStrategy())
    except CheckpointException as e:
        # raised on every rank after the finalization's gather; the details are the coordinator's
        raise DistCheckpointWriteError(f"the dist-checkpoint {directory} was not written: {e}") from e
