"""The training side of the seam: one backend instance per role (actor or critic)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tempo_mega.algo.losses import LossSpec
from tempo_mega.batch import RolloutBatch

# A loss function maps the model's output on a micro-batch ([b, L] log-probs for the actor, [b, L]
# values for the critic) and the micro-batch itself to (scalar loss, metrics). Its ``agg`` attribute
# ("seq" or "token", default "seq") tells the backend how to weight micro-batches so that gradient
# accumulation reproduces the loss of the whole mini-batch: by rows or by valid tokens.
LossFn = Callable[[Tensor, RolloutBatch], "tuple[Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and batching of one role. ``lr == 0`` means frozen: ``train_step`` computes the loss
    (without gradients) for metrics and makes no update, e.g. the frozen-critic ablation."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max grad norm; <= 0 disables clipping (the norm is still logged)
    mini_batch_size: int = 64  # rows per optimizer step
    max_tokens_per_micro_batch: int = 16384  # real tokens per forward/backward
    epochs: int = 1  # passes over the batch per train_step

    def __post_init__(self) -> None:
        for key in ("mini_batch_size", "max_tokens_per_micro_batch", "epochs"):
            if getattr(self, key) <= 0:
                raise ValueError(f"OptimConfig.{key} must be positive, got {getattr(self, key)}")
        if self.lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"OptimConfig: lr, weight_decay must be >= 0 and eps > 0, got {self}")


@runtime_checkable
class TrainBackend(Protocol):
    """What the controller and the run layer call on a backend, and nothing more."""

    role: str  # "actor" | "critic"
    device: torch.device  # where this rank's model lives
    use_kernels: bool  # the heads and the losses from tempo_mega.kernels (kernels.enable)

    def forward_logprobs(self, batch: RolloutBatch, temperature: float | None = None) -> Tensor:
        """[B, L] log-probs of the response tokens (actor) at ``temperature`` (None: rollout.temperature,
        the one the backend was built with)."""
        ...

    def forward_values(self, batch: RolloutBatch) -> Tensor:
        """[B, L] values V_t read before response token t (critic)."""
        ...

    def train_step(self, batch: RolloutBatch, loss_fn: LossSpec | LossFn) -> dict[str, float]:
        """One optimizer pass over ``batch``: mini-batches, micro-batches with accumulation, clipping.
        A ``LossSpec`` is fulfilled by the backend (``bind_loss``: its packed kernel where ``use_kernels``)."""
        ...

    def export_weights(self, device: str | torch.device | None = "cpu") -> Iterator[tuple[str, Tensor]]:
        """HF-named tensors, streamed, on ``device`` (None: where the weights live; a rollout engine that
        takes GPU tensors, SGLang's CUDA-IPC or NCCL sync, asks for them there: ``weights_device``)."""
        ...

    def load_trunk_from(self, other: TrainBackend) -> None:
        """The critic's trunk := ``other``'s (the actor's), through HF names; its value head is kept."""
        ...

    def lr_override(self, lr: float) -> contextlib.AbstractContextManager[None]:
        """Train at ``lr`` inside the block (the warm start), the configured rate after."""
        ...

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's moments, keep the weights."""
        ...

    def offload_set(self, mode: str):
        """What ``trainer.offload_during_rollout=mode`` hands over while the engine generates
        (``tempo_mega.offload.OffloadSet``): ``optimizer``, the optimizer's state and master weights;
        ``all``, the weights too, and the gradient buffers (dropped)."""
        ...

    def save(self, directory: str | Path) -> None:
        """Weights, optimizer and backend state into a checkpoint directory (a collective where sharded)."""
        ...

    def load(self, directory: str | Path) -> None: ...

    def export_hf(self, directory: str | Path) -> None:
        """An HF-loadable directory of this role's model (rank 0 writes)."""
        ...


class BoundLoss:
    """A ``LossSpec`` bound to the fields of a micro-batch (a ``LossFn``). With ``kernel`` (a packed
    tempo_mega.kernels loss that equals ``spec.fn``), the loss and its gradient come from the kernel on
    the packed valid tokens; the metrics still come from ``spec.fn``, without grad."""

    def __init__(self, spec: LossSpec, kernel: Callable | None = None):
        self.spec, self.kernel, self.agg = spec, kernel, spec.agg

    def __call__(self, output: Tensor, mb: RolloutBatch):
        s = self.spec
        mask = mb.response_mask.to(output.device)
        inputs = [output, *(getattr(mb, f).to(output.device) for f in s.fields)]
        if self.kernel is None:
            return s.fn(*inputs, mask, **s.kw)
        from tempo_mega.kernels import pack_padded

        with torch.no_grad():
            _, metrics = s.fn(*(x.detach() for x in inputs), mask, **s.kw)
        packed = [pack_padded(x, mask) for x in inputs]
        return self.kernel(*(x for x, _ in packed), packed[0][1], **s.kw), metrics


def bind_loss(loss: LossSpec | LossFn, use_kernels: bool) -> LossFn:
    """What a backend's ``train_step`` trains with: a ``LossSpec`` bound to the micro-batch fields, through
    its packed kernel where ``use_kernels`` is on and the spec names one; a plain ``LossFn`` as given."""
    if not isinstance(loss, LossSpec):
        return loss
    kernel = None
    if use_kernels and loss.kernel is not None:
        import tempo_mega.kernels as kernels

        kernel = getattr(kernels, loss.kernel)
    return BoundLoss(loss, kernel)


def weight_units(batch: RolloutBatch, agg: str) -> int:
    """Rows with at least one valid response token ("seq") or valid response tokens ("token")."""
    mask = batch.response_mask
    return int((mask.sum(-1) > 0).sum()) if agg == "seq" else int(mask.sum())


def accumulate_gradients(micro_batches: Iterable[RolloutBatch], denom: int, loss_fn: LossFn,
                         forward: Callable[[RolloutBatch], Tensor], totals: dict[str, float],
                         frozen: bool = False) -> int:
    """Forward and backward every micro-batch of one mini-batch, each loss weighted by its share of the
    mini-batch (``weight_units / denom``), so the accumulated gradient is that of the loss on the whole
    mini-batch; weighted metrics are added into ``totals``. ``frozen``: loss and metrics only, no
    gradient. Returns the number of micro-batches that counted."""
    agg = getattr(loss_fn, "agg", "seq")
    n = 0
    for micro in micro_batches:
        w = weight_units(micro, agg) / denom
        if w == 0:
            continue
        n += 1
        with torch.set_grad_enabled(not frozen):
            loss, metrics = loss_fn(forward(micro), micro)
        if not frozen:
            (loss * w).backward()
        for k, v in {**metrics, "loss": loss.detach()}.items():
            totals[k] += w * float(v)
    return n


# (micro-batches of this rank, mini-batch denominator, the whole mini-batch, metric totals, frozen)
# -> micro-batches that counted
Accumulate = Callable[[list[RolloutBatch], int, RolloutBatch, dict[str, float], bool], int]


@dataclass
class PassStats:
    """What ``optimizer_passes`` did: weighted metric sums and counters."""

    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    n_mini: int = 0
    n_micro: int = 0
    steps: int = 0
    skipped: int = 0
    grad_norms: list[float] = field(default_factory=list)

    def metrics(self, role: str, lr: float) -> dict[str, float]:
        """Metrics averaged over mini-batches, namespaced ``{role}/...``."""
        out = {f"{role}/{k}": v / max(self.n_mini, 1) for k, v in self.totals.items()}
        if self.grad_norms:
            out[f"{role}/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        out.update({f"{role}/lr": lr, f"{role}/num_optimizer_steps": float(self.steps),
                    f"{role}/skipped_steps": float(self.skipped), f"{role}/num_micro_batches": float(self.n_micro)})
        return out


def optimizer_passes(batch: RolloutBatch, loss_fn: LossFn, *, epochs: int, mini_batch_size: int,
                     max_tokens_per_micro_batch: int, clip_and_step: Callable[[], float | None],
                     forward: Callable[[RolloutBatch], Tensor] | None = None, frozen: bool = False,
                     shard: Callable[[RolloutBatch], RolloutBatch] | None = None,
                     accumulate: Accumulate | None = None) -> PassStats:
    """The optimizer loop every backend shares: for each epoch, for each mini-batch of rows (in order),
    accumulate the gradient over token-budget micro-batches, then clip and step. Mini-batches without
    a valid token are skipped (AdamW would still move the weights); ``clip_and_step`` returns the
    pre-clip grad norm, or None when the step was skipped. ``shard`` picks this rank's rows of a
    mini-batch (data parallel); the weights still use the whole mini-batch as the denominator.
    ``accumulate`` replaces the default per-micro-batch loop (``accumulate_gradients`` over ``forward``),
    e.g. by a pipeline schedule; it gets (micro-batches, denominator, mini-batch, totals, frozen)."""
    if (forward is None) == (accumulate is None):
        raise ValueError("optimizer_passes: give exactly one of forward and accumulate")
    agg = getattr(loss_fn, "agg", "seq")
    if agg not in ("seq", "token"):
        raise ValueError(f"train_step: loss_fn.agg must be 'seq' or 'token', got {agg!r}")
    stats = PassStats()
    for _ in range(epochs):
        for mini in batch.split(mini_batch_size):
            denom = weight_units(mini, agg)
            if denom == 0:
                continue
            stats.n_mini += 1
            part = shard(mini) if shard is not None else mini
            micros = part.split_by_tokens(max_tokens_per_micro_batch) if len(part) else []
            if accumulate is not None:
                stats.n_micro += accumulate(micros, denom, mini, stats.totals, frozen)
            else:
                stats.n_micro += accumulate_gradients(micros, denom, loss_fn, forward, stats.totals, frozen)
            if frozen:
                continue
            norm = clip_and_step()
            if norm is None:
                stats.skipped += 1
            else:
                stats.steps += 1
                stats.grad_norms.append(norm)
    return stats


def forward_in_micro_batches(batch: RolloutBatch, forward: Callable[[RolloutBatch], Tensor],
                             max_tokens_per_micro_batch: int, rows: Tensor | None = None) -> Tensor:
    """[B, L] float32 on CPU: ``forward`` (a [b, L'] output per micro-batch) over ``rows`` (consecutive
    row indices; default all), micro-batched by token budget; other rows stay 0. No gradient."""
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32)
    if rows is None:
        rows = torch.arange(batch.batch_size)
    if len(rows) == 0:
        return out
    start = int(rows[0])
    with torch.no_grad():
        for micro in batch.select(rows).split_by_tokens(max_tokens_per_micro_batch):  # trimmed: L' <= L
            out[start : start + micro.batch_size, : micro.response_len] = forward(micro).cpu()
            start += micro.batch_size
    return out


@contextlib.contextmanager
def lr_override(param_groups: list[dict], lr: float) -> Iterator[None]:
    """Every param group at ``lr`` inside the block (e.g. a warm start), its own rate after."""
    saved = [g["lr"] for g in param_groups]
    for g in param_groups:
        g["lr"] = lr
    try:
        yield
    finally:
        for g, old in zip(param_groups, saved):
            g["lr"] = old
