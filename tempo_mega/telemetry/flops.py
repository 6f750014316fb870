"""Model FLOPs of the actor and critic (Qwen3-style decoders) and model FLOPs utilization (MFU).

The convention, in one place (``train_flops_per_token``): per token of a sequence of length T,

    training (forward + backward)  6 * N  +  12 * L * H * Q * T
    forward only                   2 * N  +   4 * L * H * Q * T      (one third of training)
    generating one token           2 * N  +   4 * L * H * Q * kv     (kv: keys it attends to)

N counts the weights that take part in a matmul: per layer q, k, v, o and the three MLP projections
(a mixture of experts: the router and the top-k experts a token is sent to, the "active" parameters),
plus the LM head (``include_lm_head``; the critic has a [hidden -> 1] value head instead, whose
2 * hidden FLOPs per token are left out). Embedding lookups and norms are not matmuls and are not
counted; a tied embedding still costs its LM-head matmul. L is the number of layers, H the number
of query heads, Q the head dimension (H * Q is the attention width, which need not equal hidden),
and the attention term counts QK^T and AV: 2 matmuls * 2 FLOPs/MAC * H * Q * T per layer forward.

This is the PaLM convention (Chowdhery et al. 2022, appendix B: ``6N + 12 L H Q T``), the same as
Megatron-LM's ``72 B s l h^2 (1 + s/(6h) + V/(12 h l))`` (Narayanan et al. 2021, without
recomputation) when H * Q = h. **No causal halving**: every token is charged for attending to all T
positions, although a causal kernel computes about half of that score matrix; numbers are thus
comparable with PaLM/Megatron/torchtitan MFU. Recomputation (gradient checkpointing) is not counted:
this is model FLOPs (MFU), not hardware FLOPs (HFU).

Generation charges each new token for its real KV length: generated token i (1-based) of a response
after a P-token prompt attends to P + i keys, so a response of R tokens averages kv = P + (R + 1) / 2.
Prompt prefill is not counted: the engine prefills a prompt once for all its samples (prefix
cache), so it is small next to decoding, and leaving it out makes rollout MFU a lower bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PEAK_FLOPS",
    "TransformerShape",
    "forward_flops_per_token",
    "generate_flops_per_token",
    "mfu",
    "param_counts",
    "phase_mfu",
    "train_flops_per_token",
]

# Dense tensor-core peaks per GPU in FLOP/s, without 2:4 sparsity (datasheet headline numbers marked
# "with sparsity" are twice these). Sources: NVIDIA H100 Tensor Core GPU datasheet (H100 SXM5 BF16
# 989.4 TFLOPS, FP8 1,978.9; H100 PCIe BF16 756, FP8 1,513), NVIDIA H200 datasheet (H200 SXM: the
# same tensor throughput as H100 SXM, more and faster memory), NVIDIA A100 datasheet (BF16 312), NVIDIA
# B200 (HGX B200: 2.25 PFLOPS dense BF16, 4.5 FP8 per GPU).
PEAK_FLOPS: dict[str, float] = {
    "h100_sxm_bf16": 989e12,
    "h100_sxm_fp8": 1979e12,
    "h100_pcie_bf16": 756e12,
    "h100_pcie_fp8": 1513e12,
    "h200_bf16": 989e12,
    "h200_fp8": 1979e12,
    "a100_bf16": 312e12,
    "b200_bf16": 2250e12,
    "b200_fp8": 4500e12,
}

_MISSING = object()


@dataclass(frozen=True)
class TransformerShape:
    """The numbers of a Qwen3-style decoder that FLOPs depend on (HF config field names)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    # a mixture of experts (Qwen3-MoE): every layer's MLP is num_experts experts of moe_intermediate_size
    # behind a [hidden -> num_experts] router, num_experts_per_tok of them per token; 0: a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0

    @classmethod
    def of(cls, cfg: Any) -> TransformerShape:
        """From a mapping, an HF ``PretrainedConfig`` or any object with those attributes.
        ``head_dim`` defaults to hidden / heads, ``num_key_value_heads`` to the number of heads."""
        if isinstance(cfg, TransformerShape):
            return cfg

        def get(name: str, default: Any = _MISSING) -> Any:
            value = cfg.get(name, None) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
            if value is None:
                if default is _MISSING:
                    raise ValueError(f"model config has no {name!r}, which the FLOPs count needs")
                return default
            return value

        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(get("num_hidden_layers")),
            intermediate_size=int(get("intermediate_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", heads)),
            head_dim=int(get("head_dim", hidden // heads)),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            num_experts=int(get("num_experts", 0) or 0),
            num_experts_per_tok=int(get("num_experts_per_tok", 0) or 0) if get("num_experts", 0) else 0,
            moe_intermediate_size=int(get("moe_intermediate_size", 0) or 0) if get("num_experts", 0) else 0,
        )


def param_counts(cfg: Any) -> dict[str, int]:
    """Parameters of a Qwen3 causal LM by kind (no biases; RMSNorm on q and k per head).

    ``attention_per_layer`` (q, k, v, o), ``mlp_per_layer`` (gate, up, down; a mixture of experts: the
    router and every expert's), ``layers_matmul`` (L times both), ``lm_head``, ``embedding``, ``norms``,
    ``matmul`` (layers + LM head) and ``total`` (the LM head counted once when tied). ``active_*``: what one
    token multiplies with (a mixture of experts: the router and its top-k experts; dense: all of it), so
    ``active_matmul`` is the N of the FLOPs formula and ``active_total`` a MoE's "active parameters"."""
    s = TransformerShape.of(cfg)
    h, q_width, kv_width = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attention = h * q_width + 2 * h * kv_width + q_width * h
    if s.num_experts:
        expert = 3 * h * s.moe_intermediate_size
        mlp, active_mlp = h * s.num_experts + s.num_experts * expert, h * s.num_experts + s.num_experts_per_tok * expert
    else:
        mlp = active_mlp = 3 * h * s.intermediate_size
    layers = s.num_hidden_layers * (attention + mlp)
    active_layers = s.num_hidden_layers * (attention + active_mlp)
    embedding = s.vocab_size * h
    lm_head = s.vocab_size * h
    norms = s.num_hidden_layers * (2 * h + 2 * s.head_dim) + h  # input + post-attn, q_norm + k_norm; final
    untied_head = 0 if s.tie_word_embeddings else lm_head
    return {"attention_per_layer": attention, "mlp_per_layer": mlp, "layers_matmul": layers,
            "lm_head": lm_head, "embedding": embedding, "norms": norms, "matmul": layers + lm_head,
            "total": layers + embedding + norms + untied_head, "active_mlp_per_layer": active_mlp,
            "active_layers_matmul": active_layers, "active_matmul": active_layers + lm_head,
            "active_total": active_layers + embedding + norms + untied_head}


def train_flops_per_token(cfg: Any, seq_len: float, include_lm_head: bool = True) -> float:
    """Training (forward + backward) FLOPs per token of a ``seq_len``-token sequence:
    ``6 * N + 12 * L * H * Q * seq_len`` (PaLM convention, no causal halving; see the module doc).

    ``cfg``: anything ``TransformerShape.of`` reads. ``include_lm_head=False`` for the critic, whose
    trunk ends in a value head instead of the [hidden, vocab] LM head."""
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    s = TransformerShape.of(cfg)
    counts = param_counts(s)
    n_matmul = counts["active_layers_matmul"] + (counts["lm_head"] if include_lm_head else 0)
    attention = 12 * s.num_hidden_layers * s.num_attention_heads * s.head_dim * seq_len
    return float(6 * n_matmul + attention)


def forward_flops_per_token(cfg: Any, seq_len: float, include_lm_head: bool = True) -> float:
    """A no-grad forward pass (log-probs, values): one third of ``train_flops_per_token``."""
    return train_flops_per_token(cfg, seq_len, include_lm_head) / 3.0


def generate_flops_per_token(cfg: Any, prompt_len: float, response_len: float,
                             include_lm_head: bool = True) -> float:
    """Mean FLOPs per generated token of a ``response_len``-token response after ``prompt_len``
    prompt tokens: ``2 * N + 4 * L * H * Q * kv`` with the mean KV length
    ``kv = prompt_len + (response_len + 1) / 2``. Prefill is not counted (module doc)."""
    return forward_flops_per_token(cfg, prompt_len + (response_len + 1) / 2.0, include_lm_head)


def _peak(peak: float | str) -> float:
    if isinstance(peak, str):
        if peak not in PEAK_FLOPS:
            raise ValueError(f"unknown peak {peak!r}; known: {sorted(PEAK_FLOPS)} (or pass FLOP/s)")
        return PEAK_FLOPS[peak]
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak}")
    return float(peak)


def mfu(flops: float, seconds: float, num_gpus: int, peak_flops_per_gpu: float | str) -> float:
    """Model FLOPs utilization: ``flops / (seconds * num_gpus * peak_flops_per_gpu)``.
    ``peak_flops_per_gpu`` is FLOP/s or a key of ``PEAK_FLOPS``."""
    if not seconds > 0:
        raise ValueError(f"mfu: seconds must be > 0, got {seconds}")
    if num_gpus < 1:
        raise ValueError(f"mfu: num_gpus must be >= 1, got {num_gpus}")
    return float(flops) / (float(seconds) * num_gpus * _peak(peak_flops_per_gpu))


def _number(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def phase_mfu(
    metrics: Mapping[str, Any],
    actor_cfg: Any,
    critic_cfg: Any,
    num_gpus: int,
    peak: float | str,
    *,
    actor_epochs: int = 1,
    critic_epochs: int = 1,
    critic_labeled_only: bool = False,
) -> dict[str, float]:
    """MFU per phase of one controller step, from its metrics (``timing/*_s``, ``perf/num_tokens``,
    ``rollout/num_samples``, ``rollout/response_len_mean``).

    - ``perf/mfu_logprob``: actor forward + critic forward over every token, in ``timing/logprob_s``;
    - ``perf/mfu_e_step``: critic forward + backward, ``critic_epochs`` passes, in ``timing/e_step_s``
      (absent when ``critic/updated`` is 0). ``critic_labeled_only`` (TEMPO's E-step) scales the tokens
      by ``rollout/labeled_frac``; ``perf/e_step_num_tokens``, if present, is used as is;
    - ``perf/mfu_m_step``: actor forward + backward, ``actor_epochs`` passes, in ``timing/m_step_s``
      (``perf/m_step_num_tokens`` if present);
    - ``perf/mfu_rollout``: generated tokens (``perf/num_response_tokens``, else samples x mean
      length) at ``generate_flops_per_token``, in ``timing/rollout_s``; only when one generation batch
      made the step (``rollout/gen_batches`` <= 1: the tokens of dropped groups are not in the metrics).
      The phase also scores responses, so this is a lower bound;
    - ``perf/mfu``: the FLOPs of all of the above over ``timing/step_s`` (a lower bound when a phase
      could not be counted);
    - ``perf/tokens_per_s_per_gpu``: ``perf/tokens_per_s / num_gpus``.

    Sequence length T is the batch mean, ``perf/num_tokens / rollout/num_samples`` (the attention term
    is quadratic in T, so a batch of mixed lengths is slightly undercounted). Keys whose inputs are
    missing are left out; ``num_gpus`` is the GPUs that every phase runs on.
    """
    if num_gpus < 1:
        raise ValueError(f"phase_mfu: num_gpus must be >= 1, got {num_gpus}")
    peak_flops = _peak(peak)
    out: dict[str, float] = {}
    tokens_per_s = _number(metrics, "perf/tokens_per_s")
    if tokens_per_s is not None:
        out["perf/tokens_per_s_per_gpu"] = tokens_per_s / num_gpus
    tokens = _number(metrics, "perf/num_tokens")
    samples = _number(metrics, "rollout/num_samples")
    if tokens is None or not tokens > 0 or samples is None or not samples > 0:
        return out
    seq_len = tokens / samples
    flops: dict[str, float] = {}

    flops["logprob"] = tokens * (forward_flops_per_token(actor_cfg, seq_len)
                                 + forward_flops_per_token(critic_cfg, seq_len, include_lm_head=False))
    critic_updated = _number(metrics, "critic/updated")
    if critic_updated is None or critic_updated > 0:
        critic_tokens = _number(metrics, "perf/e_step_num_tokens")
        if critic_tokens is None:
            critic_tokens = tokens
            if critic_labeled_only:
                labeled_frac = _number(metrics, "rollout/labeled_frac")
                critic_tokens = tokens * labeled_frac if labeled_frac is not None else None
        if critic_tokens is not None:
            flops["e_step"] = critic_epochs * critic_tokens * train_flops_per_token(
                critic_cfg, seq_len, include_lm_head=False)
    actor_tokens = _number(metrics, "perf/m_step_num_tokens")
    flops["m_step"] = actor_epochs * (tokens if actor_tokens is None else actor_tokens) * \
        train_flops_per_token(actor_cfg, seq_len)
    gen_batches = _number(metrics, "rollout/gen_batches")
    if gen_batches is None or gen_batches <= 1:
        response_tokens = _number(metrics, "perf/num_response_tokens")
        response_len = _number(metrics, "rollout/response_len_mean")
        if response_tokens is None and response_len is not None:
            response_tokens = samples * response_len
        if response_tokens is not None and response_tokens > 0:
            response_len = response_tokens / samples
            prompt_len = max(tokens - response_tokens, 0.0) / samples
            flops["rollout"] = response_tokens * generate_flops_per_token(actor_cfg, prompt_len, response_len)

    for phase, phase_flops in flops.items():
        seconds = _number(metrics, f"timing/{phase}_s")
        if seconds is not None and seconds > 0:
            out[f"perf/mfu_{phase}"] = mfu(phase_flops, seconds, num_gpus, peak_flops)
    step_s = _number(metrics, "timing/step_s")
    if step_s is not None and step_s > 0:
        out["perf/mfu"] = mfu(sum(flops.values()), step_s, num_gpus, peak_flops)
    return out
