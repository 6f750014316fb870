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


def node_ranks() -> list[list[int]]:
    """The ranks of each node, the same lists on every rank: node 0 holds rank 0, nodes in the order of
    their first rank, ranks in order. A node is what torchrun calls one (its ``GROUP_RANK``, the node
    rank), or without torchrun a host name. A collective (every rank calls it); one process: [[0]]."""
    import os
    import socket

    import torch.distributed as dist

    if world_size() == 1:
        return [[0]]
    group = os.environ.get("GROUP_RANK")
    keys: list[Any] = [None] * world_size()
    dist.all_gather_object(keys, f"node {group}" if group is not None else f"host {socket.gethostname()}")
    nodes: dict[str, list[int]] = {}
    for r, k in enumerate(keys):
        nodes.setdefault(k, []).append(r)
    return list(nodes.values())
