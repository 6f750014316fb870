"""TEST-ONLY: run megatron-core on CPU (gloo) by redirecting its hard-coded CUDA calls.

megatron-core assumes a GPU in a few places even with ``use_cpu_initialization=True``:
``torch.cuda.current_device()`` (buffers, TP layers, mappings), the CUDA RNG state used by the
model-parallel RNG tracker (forked by attention even with dropout 0), ``torch.cuda.synchronize()``,
``device="cuda"`` literals, ``Tensor.cuda()`` and ``param.type() == "torch.cuda.FloatTensor"`` checks. ``megatron_on_cpu()``
points all of them at the CPU inside a block. Only tests import this; the product never patches
torch or megatron-core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from support.net import free_port

_fake_cuda_gen = torch.Generator()


class _CudaToCpu(TorchFunctionMode):
    """Rewrites a ``device="cuda"`` (or cuda:N) argument of any torch function to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and (str(dev).startswith("cuda") or isinstance(dev, int)):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):  # pinned host memory needs a GPU (megatron's CP RoPE slicing)
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Point megatron-core's CUDA calls at the CPU inside this block; everything is restored on exit,
    so the rest of a pytest process is untouched."""
    from megatron.core.tensor_parallel import random as mrandom

    saved = [(torch.cuda, n, getattr(torch.cuda, n)) for n in
             ("current_device", "synchronize", "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all")]
    saved += [(mrandom, n, getattr(mrandom, n)) for n in ("_get_cuda_rng_state", "_set_cuda_rng_state")]
    saved.append((torch.Tensor, "type", torch.Tensor.type))
    saved.append((torch.Tensor, "cuda", torch.Tensor.cuda))
    orig_type: Callable[..., Any] = torch.Tensor.type

    def tensor_type(self, *args, **kwargs):
        out = orig_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(out, str) and out.startswith("torch.") and \
                not out.startswith("torch.cuda."):
            return out.replace("torch.", "torch.cuda.", 1)  # the optimizers' "is it a GPU tensor" checks
        return out

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda device="cuda": _fake_cuda_gen.get_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": _fake_cuda_gen.set_state(state)
    torch.cuda.manual_seed = lambda seed: _fake_cuda_gen.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: _fake_cuda_gen.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda *a, **k: _fake_cuda_gen.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: _fake_cuda_gen.set_state(state)
    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, *a, **k: self  # e.g. the tied output weight of the last PP stage
    try:
        with _CudaToCpu():
            yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)


@contextlib.contextmanager
def one_process_world(monkeypatch, *, cpu: bool = True) -> Iterator[None]:
    """The environment of a 1-process torchrun world (megatron on the CPU unless ``cpu=False``):
    torch.distributed and megatron's parallel state are brought up by the code under test (the
    backend's init_parallel) and torn down here. Skips when a process group is already up."""
    import pytest
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    with megatron_on_cpu() if cpu else contextlib.nullcontext():
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()
