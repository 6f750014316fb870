"""The training side of the seam: one backend instance per role (actor or critic)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tempo_mega.batch import RolloutBatch

# A loss function maps the model's output on a micro-batch ([b, L] log-probs for the actor, [b, L]
# values for the critic) and the micro-batch itself to (scalar loss, metrics). Its ``agg`` attribute
# ("seq" or "token", default "seq") tells the backend how to weight micro-batches so that gradient
# accumulation reproduces the loss of the whole mini-batch: by rows or by valid tokens.
LossFn = Callable[[Tensor, RolloutBatch], "tuple[Tensor, dict[str, float]]"]


@runtime_checkable
class TrainBackend(Protocol):
    role: str  # "actor" | "critic"

    def forward_logprobs(self, batch: RolloutBatch) -> Tensor:
        """[B, L] log-probs of the response tokens (actor)."""
        ...

    def forward_values(self, batch: RolloutBatch) -> Tensor:
        """[B, L] values V_t read before response token t (critic)."""
        ...

    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer pass over ``batch``: mini-batches, micro-batches with accumulation, clipping."""
        ...

    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """HF-named tensors, streamed."""
        ...

    def save(self, directory: str | Path) -> None: ...

    def load(self, directory: str | Path) -> None: ...


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
