"""The training side of the seam: one backend instance per role (actor or critic)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

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
