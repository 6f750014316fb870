"""The per-GPU memory arithmetic of ``tempo-mega plan``: bytes from a model's shape and its parallel layout.

Exact, as the backends allocate them: each role's weights, gradient buffers and optimizer state on one
GPU, for ``MegatronBackend`` (``megatron_role_memory``: megatron-core 0.16's DDP buffers with their
padding, the distributed optimizer's DP shard) and for ``TorchBackend`` (``torch_role_memory``).
Estimated, from formulas: one micro-batch's activations under each recompute mode, the chunked log-prob
logits, and SGLang's KV cache per token and weights per GPU. Pure functions of a
``telemetry.flops.TransformerShape``; ``tempo_mega.plan`` puts them together for a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tempo_mega.telemetry.flops import TransformerShape, param_counts

# --------------------------------------------------------------------------------------------
# The model's parameters as each backend holds them
# --------------------------------------------------------------------------------------------


def _megatron_chunk_params(s: TransformerShape, role: str, tp: int, layers: int, first: bool, last: bool,
                           pp: int, ep: int = 1, etp: int | None = None) -> list[tuple[int, bool]]:
    """(numel, expert weight) of one model chunk's parameters on one TP rank, all in the model's dtype
    (the critic's value head too: it is computed in float32, ``backends/megatron/model.py``), in
    megatron's parameter order (embedding, per layer: input norm, qkv, q/k norm, proj, MLP norm, fc1, fc2
    or router + this EP rank's experts (fc1, fc2 each, split over expert TP); final norm, output layer)."""
    h, q, kv, f = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim, \
        s.intermediate_size
    etp = tp if etp is None else etp
    out: list[tuple[int, bool]] = []
    if first:
        out.append((s.vocab_size // tp * h, False))
    for _ in range(layers):
        out += [(h, False), ((q + 2 * kv) // tp * h, False), (s.head_dim, False), (s.head_dim, False),
                (h * (q // tp), False), (h, False)]
        if s.num_experts:
            fe = s.moe_intermediate_size
            out.append((s.num_experts * h, False))  # router, replicated
            for _ in range(s.num_experts // ep):
                out += [(2 * fe // etp * h, True), (h * (fe // etp), True)]
        else:
            out += [(2 * f // tp * h, False), (h * (f // tp), False)]
    if last:
        out.append((h, False))  # final norm
        if role == "critic":
            out += [(h, False), (1, False)]  # value head
        elif not s.tie_word_embeddings or pp > 1:  # tied at PP > 1: the last stage keeps its own copy
            out.append((s.vocab_size // tp * h, False))
    return out


def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass
class RoleMemory:
    """Bytes of one role on one GPU (exact), and the parameters it holds."""

    params: int  # parameters held on this GPU (its shard)
    weights: int
    grads: int
    optimizer: int  # master weights + moments + step scalars

    @property
    def state(self) -> int:
        return self.weights + self.grads + self.optimizer


def megatron_role_memory(s: TransformerShape, role: str, *, dtype_bytes: int, tp: int, pp: int, vpp: int,
                         dp: int, distributed_optimizer: bool, pp_rank: int = 0, dp_rank: int = 0, ep: int = 1,
                         etp: int | None = None, expert_dp: int | None = None) -> RoleMemory:
    """Exact bytes of ``MegatronBackend`` (megatron-core 0.16.1, overlap_grad_reduce off: one bucket per
    buffer) for one role on the GPU at (pp_rank, dp_rank). A mixture of experts' expert weights live in
    buffers of their own, sharded by the distributed optimizer over the expert data-parallel group
    (``expert_dp`` = world / (expert TP x EP x PP)); ``dp_rank`` indexes both groups."""
    per_chunk = s.num_hidden_layers // (pp * vpp)
    params = weights = grads = masters = moments = steps = 0
    for v in range(vpp):
        chunk = _megatron_chunk_params(s, role, tp, per_chunk, first=pp_rank == 0 and v == 0,
                                       last=pp_rank == pp - 1 and v == vpp - 1, pp=pp, ep=ep, etp=etp)
        # one DDP buffer for the dense and one for the expert parameters of each chunk, parameters in order
        buffers: dict[bool, list[int]] = {}
        for n, expert in chunk:
            buffers.setdefault(expert, []).append(n)
        for expert, numels in buffers.items():
            group = (expert_dp or dp) if expert else dp
            params += sum(numels)
            if not distributed_optimizer:
                weights += sum(numels) * dtype_bytes
                grads += sum(numels) * 4
                local = numels
            else:
                # megatron lays the buffer out in reverse parameter order, each start padded to 64
                ranges, start = [], 0
                for n in reversed(numels):
                    start = _ceil(start, 64)
                    ranges.append((start, start + n))
                    start += n
                size = _ceil(start, math.lcm(group, 128))
                weights += size * dtype_bytes
                grads += size * 4
                shard = size // group
                lo, hi = dp_rank * shard, (dp_rank + 1) * shard
                local = [min(b, hi) - max(a, lo) for a, b in ranges if min(b, hi) > max(a, lo)]
            if dtype_bytes < 4:
                masters += sum(local) * 4
            moments += sum(local) * 8
            steps += len(local) * 4
    return RoleMemory(params=params, weights=weights, grads=grads, optimizer=masters + moments + steps)


def torch_role_memory(s: TransformerShape, role: str, *, dtype_bytes: int) -> RoleMemory:
    """Exact bytes of ``TorchBackend`` (HF modules, torch AdamW): weights, gradients and both moments in the
    parameter dtype, one fp32 step scalar per parameter tensor."""
    counts = param_counts(s)
    trunk = counts["layers_matmul"] + counts["embedding"] + counts["norms"]
    tensors = 1 + s.num_hidden_layers * 11 + 1  # embedding; q k v o, q/k norm, gate up down, 2 norms; final
    if role == "critic":
        head = s.hidden_size + 1
        model_bytes = trunk * dtype_bytes + head * 4
        n, tensors = trunk + head, tensors + 2
    else:
        n = counts["total"]
        model_bytes = n * dtype_bytes
        tensors += 0 if s.tie_word_embeddings else 1
    return RoleMemory(params=n, weights=model_bytes, grads=model_bytes, optimizer=2 * model_bytes + 4 * tensors)


# --------------------------------------------------------------------------------------------
# Estimates: activations, logits, SGLang
# --------------------------------------------------------------------------------------------


def layer_activation_bytes_per_token(s: TransformerShape, tp: int) -> float:
    """Estimate: bytes one layer keeps per token for its backward without recompute (bf16, flash
    attention: no [T, T] scores): the two norm inputs and outputs (4 h, split over TP by sequence
    parallel), q/k/v before and after their norms and RoPE (2 (2q + 3kv)), the attention output and
    the projection input (4q), fc1's output and fc2's input (6 f), TP-sharded. A mixture of experts: each
    token's k copies through its experts (6 k f_moe) plus the permuted input and the experts' outputs
    (2 x 2 k h) and the router's float32 scores (4 E)."""
    h, q, kv, f = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim, \
        s.intermediate_size
    if s.num_experts:
        k = s.num_experts_per_tok
        mlp = 2 * 3 * k * s.moe_intermediate_size + 2 * 2 * k * h + 4 * s.num_experts
    else:
        mlp = 2 * 3 * f
    return (2 * (4 * h) + 2 * (2 * q + 3 * kv) + 2 * (2 * q) + mlp) / tp


def activation_bytes(s: TransformerShape, recompute: str, tokens: int, tp: int, layers_per_rank: int,
                     in_flight: int) -> float:
    """Estimate for one role: ``in_flight`` micro-batches of ``tokens`` tokens on a rank holding
    ``layers_per_rank`` layers. recompute=full keeps each layer's bf16 input (2 h bytes per token,
    sequence parallel over TP) and one layer's full set while it is recomputed; none and selective
    (core attention only, which flash attention already does not keep) keep every layer's full set."""
    full_set = layer_activation_bytes_per_token(s, tp) * tokens
    if recompute == "full":
        return in_flight * layers_per_rank * 2 * s.hidden_size * tokens / tp + full_set
    return in_flight * layers_per_rank * full_set


def logit_bytes(s: TransformerShape, chunk_tokens: int, tokens: int, tp: int) -> float:
    """Estimate: one chunk of vocab-parallel logits ([chunk, V / TP]: the bf16 product, its float32 copy,
    the scaled copy and the softmax kept for the backward: 14 B per element) plus the sequence-gathered
    hidden states the output layer reads ([tokens, h] bf16)."""
    return min(chunk_tokens, tokens) * (s.vocab_size / tp) * 14 + tokens * s.hidden_size * 2


def kv_bytes_per_token(s: TransformerShape, sglang_tp: int, kv_dtype_bytes: int) -> int:
    """KV cache bytes of one token on one GPU of a TP engine (KV heads split over TP, replicated past it)."""
    heads = max(1, s.num_key_value_heads // sglang_tp)
    return s.num_hidden_layers * 2 * heads * s.head_dim * kv_dtype_bytes


def sglang_weight_bytes(s: TransformerShape, sglang_tp: int) -> float:
    """bf16 weights of one GPU of a TP engine (the embedding and LM head vocab-parallel, norms replicated)."""
    return param_counts(s)["total"] * 2 / sglang_tp
