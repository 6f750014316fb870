"""The trainer's GPU memory handed over to the rollout engine while it generates
(``trainer.offload_during_rollout``): ``optimizer`` moves the optimizer's state (Adam moments and the fp32
master weights) to host memory, ``all`` also the model's weights, and frees its gradient buffers.

The mechanism is megatron-core's own (``_ParamAndGradBuffer.offload_to_cpu`` / ``reload_from_cpu``,
``DistributedDataParallel.offload_grad_buffers``): each tensor's *storage* is copied into a host buffer
(pinned on a CUDA machine, so the copies run at PCIe speed and overlap) and then resized to zero bytes,
and on reload resized back and copied in. Every tensor object, and every view of it (megatron's
``param.main_grad``, the DDP buckets, the optimizer's own references), stays the same object and sees its
data again: nothing is rebuilt, and the caching allocator hands the freed blocks to the engine's process
after ``torch.cuda.empty_cache``. Gradient buffers are dropped, not copied (every train step zeroes them
first), and come back zeroed. megatron-core's functions themselves are CUDA-only (their CPU paths alias
the tensor they copy); this applies the same steps to any device, so the CPU tests run this very code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "optimizer", "all")


@dataclass
class OffloadSet:
    """What one backend hands over: ``keep`` is copied to host memory and back, ``drop`` is freed and
    comes back zeroed (gradient buffers)."""

    keep: list[Tensor] = field(default_factory=list)
    drop: list[Tensor] = field(default_factory=list)


def _storage_key(t: Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return str(st.device), st.data_ptr()


class HostOffload:
    """Tensors' storages moved to host memory and back in place (see the module docstring). ``offload``
    and ``reload`` are idempotent; ``offloaded_bytes`` is what the last ``offload`` freed on the device."""

    def __init__(self) -> None:
        self._held: list[tuple[torch.UntypedStorage, Tensor | None, int]] = []  # storage, host copy, bytes
        self.offloaded_bytes = 0
        # the host buffers, kept from one offload to the next (pinning tens of GiB takes seconds: once per
        # run, as megatron-core keeps its param_data_cpu), by storage
        self._buffers: dict[int, Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self._held)

    def offload(self, what: OffloadSet) -> int:
        """Free the storages of ``what`` (each once, however many tensors view it); returns the bytes."""
        if self._held:
            return self.offloaded_bytes
        seen: set[tuple[str, int]] = set()
        todo: list[tuple[torch.UntypedStorage, bool]] = []
        for tensors, copy in ((what.keep, True), (what.drop, False)):
            for t in tensors:
                if not t.untyped_storage().resizable():
                    # a CPU tensor read straight from a file (safetensors maps it): into a storage of its own
                    # first, which can be freed (a GPU tensor is always a copy already)
                    t.data = t.data.clone()
                st = t.untyped_storage()
                key = _storage_key(t)
                if st.nbytes() == 0 or key in seen:
                    continue
                seen.add(key)
                todo.append((st, copy))
        cuda = any(st.device.type == "cuda" for st, _ in todo)
        for st, copy in todo:
            host = None
            if copy:
                key = st._cdata  # the storage itself (its data pointer changes with every resize)
                host = self._buffers.get(key)
                if host is None or host.numel() != st.nbytes():
                    host = self._buffers[key] = torch.empty(st.nbytes(), dtype=torch.uint8,
                                                            pin_memory=st.device.type == "cuda")
                host.untyped_storage().copy_(st, non_blocking=st.device.type == "cuda")
            self._held.append((st, host, st.nbytes()))
        if cuda:
            torch.cuda.synchronize()  # every copy landed before its storage goes
        for st, _, _ in self._held:
            st.resize_(0)
        if cuda:
            torch.cuda.empty_cache()  # the freed blocks back to the driver, for the engine's process
        self.offloaded_bytes = sum(n for _, _, n in self._held)
        return self.offloaded_bytes

    def reload(self) -> None:
        """Every storage back to its size and contents (dropped ones zeroed)."""
        if not self._held:
            return
        cuda = False
        for st, host, nbytes in self._held:
            st.resize_(nbytes)
            cuda = cuda or st.device.type == "cuda"
            if host is not None:
                st.copy_(host.untyped_storage(), non_blocking=st.device.type == "cuda")
            else:
                torch.empty(0, dtype=torch.uint8, device=st.device).set_(st).zero_()
        if cuda:
            torch.cuda.synchronize()
        self._held = []


def optimizer_tensors(optimizers: Iterable[torch.optim.Optimizer], skip: set[tuple[str, int]]) -> list[Tensor]:
    """The state tensors (moments, step counts on the device) and parameter tensors of torch optimizers, but
    those whose storage is in ``skip`` (the model's own weights, which an fp32 optimizer steps in place)."""
    out: list[Tensor] = []
    for opt in optimizers:
        for state in opt.state.values():
            out += [v for v in state.values() if isinstance(v, Tensor) and _storage_key(v) not in skip]
        for group in opt.param_groups:
            out += [p for p in group["params"] if isinstance(p, Tensor) and _storage_key(p) not in skip]
    return out


def storage_keys(tensors: Iterable[Tensor]) -> set[tuple[str, int]]:
    return {_storage_key(t) for t in tensors}


class TrainerOffload:
    """Both roles' memory handed over during rollout (``mode``: ``trainer.offload_during_rollout``).
    ``offload()`` before the engine generates, ``reload()`` before the trainer computes again: each
    idempotent, so every rollout call and every trainer entry point may ask."""

    def __init__(self, mode: str, backends: Iterable) -> None:
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"config key 'trainer.offload_during_rollout': must be one of {OFFLOAD_MODES}, "
                             f"got {mode!r}")
        self.mode = mode
        self.backends = list(backends)
        self._offloads = [HostOffload() for _ in self.backends]

    @property
    def active(self) -> bool:
        return any(o.active for o in self._offloads)

    def offload(self) -> dict[str, float]:
        if self.mode == "none" or self.active:
            return {}
        freed = 0
        for b, o in zip(self.backends, self._offloads):
            freed += o.offload(b.offload_set(self.mode))
        log.debug("trainer offload (%s): %.2f GiB to host memory", self.mode, freed / 2**30)
        return {"perf/offloaded_gib": freed / 2**30}

    def reload(self) -> None:
        for o in self._offloads:
            o.reload()
