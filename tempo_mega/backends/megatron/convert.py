"""Qwen3 (dense, and the mixture-of-experts Qwen3-MoE: ``convert_moe.py``) HF <-> megatron.core: the
config and the weights, exactly.

Weight layout in megatron-core (local and Transformer Engine specs), for one layer ``i``:

- ``self_attention.linear_qkv.weight`` [G * (H/G + 2) * D, hidden]: per query group g (G = KV heads,
  H = query heads, D = head_dim) the group's H/G query heads, then its key head, then its value head.
  Column parallel: TP rank r holds groups ``[r * G/tp, (r + 1) * G/tp)``.
- ``mlp.linear_fc1.weight`` [2 * ffn, hidden] = [gate; up]. Column parallel with each half split on
  its own: TP rank r holds [gate_r; up_r].
- ``linear_proj`` and ``linear_fc2`` are row parallel (split on the input dim), the word embeddings
  and ``output_layer`` vocab parallel (split on dim 0), the norms replicated.
- Norms: ``input_layernorm`` / ``pre_mlp_layernorm`` in the local spec; the TE spec fuses them into
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (``te_layout=True``).
- ``q_layernorm`` / ``k_layernorm`` (per head_dim, shared by heads) = HF ``q_norm`` / ``k_norm``.

The critic is the same trunk with ``output_layer`` a [1, hidden] value head with a bias (replicated),
named ``value_head.weight`` / ``value_head.bias`` on the HF side, the trunk under ``model.*``.
Every tensor is moved, never recomputed, so HF -> mcore -> HF is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tempo_mega.backends.megatron import convert_moe as moe
from tempo_mega.backends.megatron.convert_moe import _get

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# mcore per-layer name -> (HF per-layer name, TP split: None = replicated, 0 or 1 = dim)
_LAYER_SIMPLE = {
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", None),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", None),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
}
_NORMS_LOCAL = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}
_NORMS_TE = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}


# ---------------------------------------------------------------------------------------------- config
def rope_theta(hf_config: Any) -> float:
    params = _get(hf_config, "rope_parameters") or {}
    theta = params.get("rope_theta", _get(hf_config, "rope_theta"))
    if theta is None:
        raise ValueError("HF config: no rope_theta (neither rope_parameters.rope_theta nor rope_theta)")
    return float(theta)


def validate_hf_config(hf_config: Any) -> None:
    """Raise ``ValueError`` naming the HF config field that this converter cannot map exactly."""
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"HF config: model_type={model_type!r} is not supported (supported: "
                         f"{SUPPORTED_MODEL_TYPES})")
    if moe.is_moe(hf_config):
        moe.validate_moe_config(hf_config)
    else:
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if _get(hf_config, key):
                raise ValueError(f"HF config: {key}={_get(hf_config, key)} (mixture of experts) with "
                                 f"model_type={model_type!r}: only qwen3_moe is a mixture of experts here")
    if _get(hf_config, "attention_bias", False):
        raise ValueError("HF config: attention_bias=True is not supported (Qwen3 dense has no attention bias)")
    if _get(hf_config, "mlp_bias", False):
        raise ValueError("HF config: mlp_bias=True is not supported")
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"HF config: hidden_act={_get(hf_config, 'hidden_act')!r} is not supported (only 'silu')")
    if _get(hf_config, "use_sliding_window", False):
        raise ValueError("HF config: use_sliding_window=True is not supported")
    params = _get(hf_config, "rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = _get(hf_config, "rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(f"HF config: rope_parameters.rope_type={rope_type!r} / rope_scaling={scaling!r}: "
                         "only default RoPE is supported")
    rope_theta(hf_config)
    heads, kv = _get(hf_config, "num_attention_heads"), _get(hf_config, "num_key_value_heads") or \
        _get(hf_config, "num_attention_heads")
    if heads % kv:
        raise ValueError(f"HF config: num_key_value_heads={kv} does not divide num_attention_heads={heads}")


def head_dim(hf_config: Any) -> int:
    d = _get(hf_config, "head_dim")
    return int(d) if d else _get(hf_config, "hidden_size") // _get(hf_config, "num_attention_heads")


def _num_kv_heads(hf_config: Any) -> int:
    return int(_get(hf_config, "num_key_value_heads") or _get(hf_config, "num_attention_heads"))


# what megatron.fusions turns on (TransformerConfig fields); masked-softmax fusion is not among them:
# Transformer Engine's attention does its own softmax
FUSIONS = {"gradient_accumulation_fusion": True, "bias_activation_fusion": True, "bias_dropout_fusion": True,
           "apply_rope_fusion": True}


def to_transformer_config(hf_config: Any, megatron_config: Any = None, **overrides: Any):
    """HF Qwen3 config (+ ``MegatronConfig``) -> ``megatron.core.transformer.TransformerConfig``.

    Numerics chosen for exactness against HF: dropout 0, softmax in fp32, every fusion off unless
    ``megatron.fusions`` (GPU and Transformer Engine only; ``build_model`` checks). ``overrides`` win over
    all else.
    """
    from megatron.core.transformer import TransformerConfig

    from tempo_mega.backends.megatron.config import MegatronConfig

    validate_hf_config(hf_config)
    mc = (megatron_config or MegatronConfig(params_dtype="float32")).resolved()
    mc.validate_for(num_attention_heads=_get(hf_config, "num_attention_heads"),
                    num_key_value_heads=_num_kv_heads(hf_config),
                    num_layers=_get(hf_config, "num_hidden_layers"), vocab_size=_get(hf_config, "vocab_size"),
                    num_experts=moe.num_experts(hf_config) if moe.is_moe(hf_config) else None)
    dtype = getattr(torch, mc.params_dtype)
    kwargs: dict[str, Any] = dict(
        num_layers=_get(hf_config, "num_hidden_layers"),
        hidden_size=_get(hf_config, "hidden_size"),
        ffn_hidden_size=_get(hf_config, "intermediate_size"),
        num_attention_heads=_get(hf_config, "num_attention_heads"),
        num_query_groups=_num_kv_heads(hf_config),
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(_get(hf_config, "rms_norm_eps")),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=float(_get(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=mc.tensor_parallel_size,
        pipeline_model_parallel_size=mc.pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=mc.vpp,
        context_parallel_size=mc.context_parallel_size,
        sequence_parallel=mc.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU init draws every full weight on every rank before slicing it (minutes at 32B); on a GPU the
        # random init (overwritten by the starting weights anyway) is megatron's usual on-device one
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    if mc.recompute == "selective":
        kwargs["recompute_granularity"] = "selective"
    elif mc.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mc.fp8 != "none":
        kwargs.update(fp8=mc.fp8, fp8_recipe=mc.fp8_recipe)
    if mc.fusions:
        kwargs.update(FUSIONS)
    if moe.is_moe(hf_config):
        if mc.tensor_parallel_size > 1 and not mc.sequence_parallel:
            raise ValueError(f"megatron.sequence_parallel must be true for a mixture of experts with "
                             f"megatron.tensor_parallel_size={mc.tensor_parallel_size} (megatron-core requires it)")
        kwargs.update(moe.transformer_kwargs(hf_config), **moe.megatron_kwargs(mc))
    kwargs.update(overrides)
    if moe.is_moe(hf_config) and kwargs["num_moe_experts"] % kwargs["expert_model_parallel_size"]:
        raise ValueError(f"expert_model_parallel_size={kwargs['expert_model_parallel_size']} does not divide "
                         f"num_experts={kwargs['num_moe_experts']}")
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(hf_config: Any, *, role: str = "actor") -> dict[str, Any]:
    """The ``GPTModel`` arguments besides config and layer spec."""
    validate_hf_config(hf_config)
    return dict(
        vocab_size=_get(hf_config, "vocab_size"),
        max_sequence_length=_get(hf_config, "max_position_embeddings"),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=role == "actor" and bool(_get(hf_config, "tie_word_embeddings", False)),
        parallel_output=True,
    )


# ---------------------------------------------------------------------------------------------- weights
def _tp_chunk(t: Tensor, dim: int | None, tp_rank: int, tp_size: int) -> Tensor:
    if dim is None or tp_size == 1:
        return t
    if t.shape[dim] % tp_size:
        raise ValueError(f"cannot split a tensor of shape {tuple(t.shape)} in {tp_size} TP shards on dim {dim}")
    return t.chunk(tp_size, dim=dim)[tp_rank]


def _qkv_to_mcore(q: Tensor, k: Tensor, v: Tensor, hf_config: Any) -> Tensor:
    groups, d = _num_kv_heads(hf_config), head_dim(hf_config)
    hidden = q.shape[1]
    q = q.reshape(groups, -1, hidden)  # [G, H/G * D, hidden]
    return torch.cat([q, k.reshape(groups, d, hidden), v.reshape(groups, d, hidden)], dim=1).reshape(-1, hidden)


def _qkv_from_mcore(qkv: Tensor, hf_config: Any) -> tuple[Tensor, Tensor, Tensor]:
    groups, d = _num_kv_heads(hf_config), head_dim(hf_config)
    per_group = _get(hf_config, "num_attention_heads") // groups * d
    hidden = qkv.shape[1]
    q, k, v = qkv.reshape(groups, per_group + 2 * d, hidden).split([per_group, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def layer_offset(hf_config: Any, pp_rank: int, pp_size: int, vp_stage: int = 0, vp_size: int = 1) -> int:
    """Global index of the first layer of PP stage ``pp_rank``'s model chunk ``vp_stage`` (megatron's
    even split: chunk v of stage p holds layers ``v * n/vp + p * n/(pp * vp)`` onwards)."""
    n = _get(hf_config, "num_hidden_layers")
    if n % (pp_size * vp_size):
        raise ValueError(f"megatron.pipeline_parallel_size={pp_size} x megatron.virtual_pipeline_parallel_size="
                         f"{vp_size} does not divide num_hidden_layers={n}")
    return vp_stage * (n // vp_size) + pp_rank * (n // (pp_size * vp_size))


def hf_to_mcore_state_dict(hf_sd: Mapping[str, Tensor], hf_config: Any, tp_rank: int = 0, tp_size: int = 1, *,
                           pp_rank: int = 0, pp_size: int = 1, te_layout: bool = False, vp_stage: int = 0,
                           vp_size: int = 1, ep_rank: int = 0, ep_size: int = 1, expert_tp: bool = True,
                           grouped_gemm: bool = False) -> dict[str, Tensor]:
    """The megatron state dict of TP rank ``tp_rank`` / PP stage ``pp_rank`` / virtual chunk ``vp_stage``
    (layer names local to the chunk). Actor: ``Qwen3ForCausalLM`` names (``lm_head.weight`` may be absent when tied). Critic: the
    same trunk names plus ``value_head.weight`` / ``value_head.bias`` (detected by their presence).
    Qwen3-MoE: the experts of EP rank ``ep_rank`` of ``ep_size``, split over TP when ``expert_tp``
    (expert TP = TP) or whole on every TP rank (expert TP = 1), in the sequential or ``grouped_gemm``
    layout (``convert_moe.py``)."""
    validate_hf_config(hf_config)
    critic = "value_head.weight" in hf_sd
    tied = not critic and bool(_get(hf_config, "tie_word_embeddings", False))
    n_layers = _get(hf_config, "num_hidden_layers")
    per_stage = n_layers // (pp_size * vp_size)
    offset = layer_offset(hf_config, pp_rank, pp_size, vp_stage, vp_size)
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == pp_size - 1 and vp_stage == vp_size - 1
    norms = _NORMS_TE if te_layout else _NORMS_LOCAL
    sparse = moe.is_moe(hf_config)
    if sparse and te_layout:  # the TE MoE layer keeps its own pre-MLP norm (nothing to fuse it into)
        norms = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                 "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}

    def need(name: str) -> Tensor:
        if name not in hf_sd:
            raise ValueError(f"HF state dict: {name!r} is missing")
        return hf_sd[name]

    out: dict[str, Tensor] = {}
    if first or (tied and last):
        # with PP and tied embeddings the last stage holds its own copy of the embedding as output weight
        emb = _tp_chunk(need("model.embed_tokens.weight"), 0, tp_rank, tp_size)
        if first:
            out["embedding.word_embeddings.weight"] = emb
        if tied and last and not first:
            out["output_layer.weight"] = emb
    for local in range(per_stage):
        hf = f"model.layers.{local + offset}."
        mc = f"decoder.layers.{local}."
        for mname, (hname, dim) in _LAYER_SIMPLE.items():
            if not (sparse and mname.startswith("mlp.")):  # a MoE layer's MLP is its experts, below
                out[mc + mname] = _tp_chunk(need(hf + hname), dim, tp_rank, tp_size)
        for mname, hname in norms.items():
            out[mc + mname] = need(hf + hname)
        q, k, v = (need(hf + f"self_attn.{x}_proj.weight") for x in "qkv")
        out[mc + "self_attention.linear_qkv.weight"] = _tp_chunk(_qkv_to_mcore(q, k, v, hf_config), 0, tp_rank, tp_size)
        if sparse:
            out.update(moe.layer_to_mcore(need, hf_sd.__contains__, hf, mc, hf_config, ep_rank=ep_rank,
                                          ep_size=ep_size, etp_rank=tp_rank if expert_tp else 0,
                                          etp_size=tp_size if expert_tp else 1, grouped_gemm=grouped_gemm))
            continue
        gate = _tp_chunk(need(hf + "mlp.gate_proj.weight"), 0, tp_rank, tp_size)
        up = _tp_chunk(need(hf + "mlp.up_proj.weight"), 0, tp_rank, tp_size)
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    if last:
        out["decoder.final_layernorm.weight"] = need("model.norm.weight")
        if critic:
            out["output_layer.weight"] = need("value_head.weight")
            out["output_layer.bias"] = need("value_head.bias")
        elif not tied:
            out["output_layer.weight"] = _tp_chunk(need("lm_head.weight"), 0, tp_rank, tp_size)
    return {k: v.contiguous() for k, v in out.items()}


def mcore_to_hf_tensors(name: str, shards: Sequence[Tensor], hf_config: Any, *, critic: bool = False,
                        layer_offset: int = 0, ep_rank: int = 0, ep_size: int = 1) -> list[tuple[str, Tensor]]:
    """One megatron tensor, given as its TP shards in rank order, -> its HF (name, tensor) pairs.
    ``[]`` for names without an HF counterpart (``_extra_state``, the tied output copy). An expert's
    tensor is named by its global index (EP rank ``ep_rank`` of ``ep_size``); give it its expert-TP
    shards (one shard when expert TP = 1)."""
    if name.endswith("_extra_state"):
        return []

    def cat(dim: int) -> Tensor:
        return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)

    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", cat(0))]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shards[0])]
    if name.startswith("output_layer."):
        if critic:
            return [("value_head." + name.split(".", 1)[1], shards[0])]
        if bool(_get(hf_config, "tie_word_embeddings", False)):
            return []
        return [("lm_head.weight", cat(0))]
    m = _LAYER.match(name)
    if not m:
        raise ValueError(f"megatron state dict: unexpected tensor {name!r}")
    hf = f"model.layers.{int(m.group(1)) + layer_offset}."
    sub = m.group(2)
    if moe.is_moe(hf_config):
        pairs = moe.tensors_from_mcore(sub, shards, hf, hf_config, ep_rank=ep_rank, ep_size=ep_size)
        if pairs is not None:
            return pairs
    if sub in _LAYER_SIMPLE:
        hname, dim = _LAYER_SIMPLE[sub]
        return [(hf + hname, shards[0] if dim is None else cat(dim))]
    if sub in _NORMS_LOCAL:
        return [(hf + _NORMS_LOCAL[sub], shards[0])]
    if sub in _NORMS_TE:
        return [(hf + _NORMS_TE[sub], shards[0])]
    if sub == "self_attention.linear_qkv.weight":
        q, k, v = _qkv_from_mcore(cat(0), hf_config)
        return [(hf + "self_attn.q_proj.weight", q), (hf + "self_attn.k_proj.weight", k),
                (hf + "self_attn.v_proj.weight", v)]
    if sub == "mlp.linear_fc1.weight":
        halves = [s.chunk(2, dim=0) for s in shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return [(hf + "mlp.gate_proj.weight", gate), (hf + "mlp.up_proj.weight", up)]
    raise ValueError(f"megatron state dict: unexpected tensor {name!r}")


def mcore_to_hf_state_dict(tp_shards: Sequence[Mapping[str, Tensor]], hf_config: Any, *, pp_rank: int = 0,
                           pp_size: int = 1, ep_rank: int = 0, ep_size: int = 1,
                           expert_tp: bool = True) -> dict[str, Tensor]:
    """The TP shards of one PP stage (``tp_shards[r]`` = rank r's megatron state dict) -> HF tensors of
    that stage; merge the stages' dicts for the whole model. Critic when ``output_layer.bias`` exists.
    Qwen3-MoE: the shards of EP rank ``ep_rank`` give its experts (``expert_tp`` as in
    ``hf_to_mcore_state_dict``); merge the EP ranks' dicts too."""
    validate_hf_config(hf_config)
    if not tp_shards:
        raise ValueError("mcore_to_hf_state_dict: no shards")
    critic = "output_layer.bias" in tp_shards[0]
    offset = layer_offset(hf_config, pp_rank, pp_size)
    out: dict[str, Tensor] = {}
    for name in tp_shards[0]:
        if pp_rank > 0 and name == "output_layer.weight" and not critic and \
                bool(_get(hf_config, "tie_word_embeddings", False)):
            continue
        shards = [sd[name] for sd in tp_shards]
        m = _LAYER.match(name)
        if not expert_tp and m and moe.expert_of(m.group(2)) is not None:
            shards = shards[:1]  # expert TP = 1: every TP rank holds the whole expert
        for hname, t in mcore_to_hf_tensors(name, shards, hf_config, critic=critic, layer_offset=offset,
                                            ep_rank=ep_rank, ep_size=ep_size):
            out[hname] = t.contiguous()
    return out
