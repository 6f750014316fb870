"""Log-probs from vocab-parallel logits: ``vocab_parallel_logprobs`` (the full vocabulary is never
gathered) and ``_SumOverGroup``, an all-reduce whose backward passes the gradient through."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch import Tensor


def vocab_parallel_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                            chunk_tokens: int) -> Tensor:
    """[N] float32 log-probs of ``targets`` under softmax(hidden @ weight.T / temperature), where
    ``weight`` is this TP rank's vocabulary shard [V/tp, H]: the vocabulary is never gathered (megatron's
    vocab-parallel cross-entropy), and with gradients on, each chunk of ``chunk_tokens`` rows is
    recomputed in the backward, so no more than [chunk, V/tp] logits live at once. ``hidden``'s
    gradient is summed over TP, as the column-parallel output layer would."""
    from torch.utils.checkpoint import checkpoint

    hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)

    def piece(h: Tensor, t: Tensor) -> Tensor:
        logits = torch.nn.functional.linear(h, weight).float() / temperature
        return -tensor_parallel.vocab_parallel_cross_entropy(logits[:, None], t[:, None])[:, 0]

    n = hidden.shape[0]
    if n <= chunk_tokens:
        return piece(hidden, targets)
    recompute = torch.is_grad_enabled()
    outs = [checkpoint(piece, hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens], use_reentrant=False)
            if recompute else piece(hidden[i : i + chunk_tokens], targets[i : i + chunk_tokens])
            for i in range(0, n, chunk_tokens)]
    return torch.cat(outs)


class _SumOverGroup(torch.autograd.Function):
    """Sum over a process group in the forward; in the backward every rank keeps its own gradient
    (every rank computes the same loss from the sum, so summing the gradients too would count them
    once per rank)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


