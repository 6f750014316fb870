"""Which process this is in a multi-process run (torchrun: one process per GPU), and the few collectives
the trainer itself needs. Everything answers for a one-process run too (no process group: rank 0 of 1).

The rule for files: every rank takes part in the collectives (weights, checkpoints of the backends),
rank 0 alone writes the run's own files (metrics, config, trainer state, HF export) and publishes a
checkpoint directory once every rank has written its part.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def _up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _up() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _up() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled)."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a preemption signal that reached only some
    processes: all of them must take the same checkpoint-and-exit path, or the collectives hang)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
