"""Samples as flat tensors: how rank 0's samples reach the other ranks of a run.

A step's samples at the paper's shape are 2,048 responses of up to 16,384 tokens (33.5M tokens).
Pickled (what ``broadcast_object_list`` does) they are lists of Python ints and floats; as flat
tensors they are four buffers (token ids int32, log-probs float32, lengths and prompt indices int64)
plus a small pickled remainder (finish reasons and extras), a fifth buffer for a mixture of experts'
routed experts (``Sample.routed_experts``, concatenated), and building them, moving them and
reading them back costs no Python work per token (``scripts/bench_host_step.py`` measures both).

The log-probs travel as float32, the precision ``RolloutBatch`` keeps them in: the batch every rank
builds from the unpacked samples is the one rank 0 builds from its own.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tempo_mega.batch import flat_numbers
from tempo_mega.rollout.base import Sample


def pack_samples(samples: Sequence[Sample]) -> tuple[list[Tensor], bytes]:
    """``samples`` as ``([lengths, prompt_index, token_ids, logprobs(, routed_experts)], rest)``: the
    tensors flat (the routed experts, where the samples carry them, concatenated over the samples' token
    rows), ``rest`` the pickled finish reasons, extras and expert row counts. ``unpack_samples`` gives the
    samples back."""
    lengths = np.fromiter((len(s.response_ids) for s in samples), dtype=np.int64, count=len(samples))
    for s, n in zip(samples, lengths.tolist()):
        if len(s.logprobs) != n:
            raise ValueError(f"pack_samples: a sample of prompt {s.prompt_index} has {n} response tokens but "
                             f"{len(s.logprobs)} log-probs")
    total = int(lengths.sum())
    tensors = [
        torch.from_numpy(lengths),
        torch.tensor([s.prompt_index for s in samples], dtype=torch.int64),
        torch.from_numpy(flat_numbers([s.response_ids for s in samples], np.int32, total)),
        torch.from_numpy(flat_numbers([s.logprobs for s in samples], np.float32, total)),
    ]
    expert_rows = None
    routed = [s.routed_experts for s in samples]
    if samples and any(r is not None for r in routed):
        if any(r is None for r in routed):
            raise ValueError("pack_samples: some samples carry routed experts and some do not")
        shapes = {(tuple(r.shape[1:]), r.dtype) for r in routed}
        if len(shapes) != 1:
            raise ValueError(f"pack_samples: the samples' routed experts differ in layout: {sorted(map(str, shapes))}")
        expert_rows = [int(r.shape[0]) for r in routed]
        tensors.append(torch.cat([r.cpu() for r in routed]))
    rest = pickle.dumps(([(s.finish_reason, s.extra) for s in samples], expert_rows), protocol=pickle.HIGHEST_PROTOCOL)
    return tensors, rest


def unpack_samples(tensors: Sequence[Tensor], rest: bytes) -> list[Sample]:
    """The samples ``pack_samples`` packed (log-probs rounded to float32)."""
    lengths, prompt_index, ids, logprobs = (t.cpu() for t in tensors[:4])
    sizes = lengths.tolist()
    tails, expert_rows = pickle.loads(rest)
    id_rows = [c.tolist() for c in ids.split(sizes)]
    lp_rows = [c.tolist() for c in logprobs.split(sizes)]
    experts = list(tensors[4].cpu().split(expert_rows)) if expert_rows is not None else [None] * len(sizes)
    return [Sample(prompt_index=p, response_ids=i, logprobs=lp, finish_reason=fr, extra=ex, routed_experts=r)
            for p, i, lp, (fr, ex), r in zip(prompt_index.tolist(), id_rows, lp_rows, tails, experts)]


def broadcast_samples(samples: Sequence[Sample] | None, src: int = 0, group=None) -> list[Sample]:
    """``src``'s samples on every rank of ``group`` (all ranks call it; the others pass None): one small
    object broadcast for the sizes and the remainder, then one broadcast per flat tensor (on the
    current CUDA device under NCCL). In a one-process world the samples are returned as given."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return list(samples or [])
    me = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    if me == src:
        tensors, rest = pack_samples(samples)
        header = [(len(samples), int(tensors[2].numel()), rest,
                   (tuple(tensors[4].shape), tensors[4].dtype) if len(tensors) > 4 else None)]
    else:
        header = [None]
    dist.broadcast_object_list(header, src=src, group=group)
    count, total, rest, experts = header[0]
    if me != src:
        tensors = [torch.empty(count, dtype=torch.int64), torch.empty(count, dtype=torch.int64),
                   torch.empty(total, dtype=torch.int32), torch.empty(total, dtype=torch.float32)]
        if experts is not None:
            tensors.append(torch.empty(experts[0], dtype=experts[1]))
    moved = [t.to(device) for t in tensors]
    for t in moved:
        if t.numel():
            dist.broadcast(t, src=src, group=group)
    if me == src:
        return list(samples)
    return unpack_samples(moved, rest)
