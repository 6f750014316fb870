"""Qwen3-MoE (``qwen3_moe``) HF <-> megatron-core: the mixture-of-experts part of a layer, exactly.

HF (checkpoint names, one tensor per expert; transformers >= 5 fuses them in memory into
``mlp.experts.gate_up_proj`` [E, 2F, H] = [gate; up] per expert and ``mlp.experts.down_proj`` [E, H, F],
both read here):

- ``mlp.gate.weight`` [E, H]: the router.
- ``mlp.experts.{e}.gate_proj.weight`` / ``up_proj.weight`` [F, H], ``down_proj.weight`` [H, F].

megatron-core, for EP rank ``p`` of ``ep`` (local experts ``l = 0 .. E/ep - 1`` are the global experts
``p * E/ep + l``) and expert-TP rank ``r`` of ``etp``:

- ``mlp.router.weight`` [E, H], replicated.
- sequential experts: ``mlp.experts.local_experts.{l}.linear_fc1.weight`` [2F/etp, H] = [gate_r; up_r]
  (each half split on its own, as the dense fc1) and ``...linear_fc2.weight`` [H, F/etp] (row parallel);
  grouped GEMM (``TEGroupedMLP``): ``mlp.experts.linear_fc1.weight{l}`` / ``linear_fc2.weight{l}``, the
  same tensors.

Routing: Qwen3-MoE takes softmax over all experts, then the top k, renormalised when
``norm_topk_prob``; megatron's router with ``moe_router_pre_softmax=False`` takes softmax over the top k
logits, the same numbers, and with ``pre_softmax=True`` softmax first and no renormalisation. Qwen3-MoE
has no shared expert; every layer is sparse (``decoder_sparse_step=1``, no ``mlp_only_layers``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

MOE_MODEL_TYPES = ("qwen3_moe",)

_SEQUENTIAL = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_GROUPED = re.compile(r"^mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    """A field of an HF config object or of its dict (``convert.py`` reads them through this too)."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def is_moe(hf_config: Any) -> bool:
    return _get(hf_config, "model_type") in MOE_MODEL_TYPES


def num_experts(hf_config: Any) -> int:
    return int(_get(hf_config, "num_experts"))


def validate_moe_config(hf_config: Any) -> None:
    """Raise ``ValueError`` naming the Qwen3-MoE config field this converter cannot map exactly."""
    e, k = _get(hf_config, "num_experts"), _get(hf_config, "num_experts_per_tok")
    if not e or not k or not 1 <= k <= e:
        raise ValueError(f"HF config: num_experts={e}, num_experts_per_tok={k}: need 1 <= top-k <= experts")
    if _get(hf_config, "decoder_sparse_step", 1) != 1:
        raise ValueError(f"HF config: decoder_sparse_step={_get(hf_config, 'decoder_sparse_step')} is not "
                         "supported (every layer sparse, as in the released Qwen3-MoE models)")
    if _get(hf_config, "mlp_only_layers"):
        raise ValueError(f"HF config: mlp_only_layers={_get(hf_config, 'mlp_only_layers')} is not supported")
    for key in ("shared_expert_intermediate_size", "n_shared_experts"):
        if _get(hf_config, key):
            raise ValueError(f"HF config: {key}={_get(hf_config, key)}: shared experts are not supported")
    if not _get(hf_config, "moe_intermediate_size"):
        raise ValueError("HF config: moe_intermediate_size is missing")


def transformer_kwargs(hf_config: Any) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of Qwen3-MoE's experts and router (its shape and routing rule);
    how they are laid out and trained is ``megatron_kwargs``'. The router's logits are computed in the
    model's dtype, as HF (and the sampler) compute them."""
    validate_moe_config(hf_config)
    return dict(
        num_moe_experts=num_experts(hf_config),
        moe_router_topk=int(_get(hf_config, "num_experts_per_tok")),
        moe_ffn_hidden_size=int(_get(hf_config, "moe_intermediate_size")),
        moe_router_pre_softmax=not bool(_get(hf_config, "norm_topk_prob", True)),
        moe_router_score_function="softmax",
    )


def megatron_kwargs(megatron_config: Any) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of a ``MegatronConfig``'s MoE keys: expert parallel sizes, the
    token dispatcher, the expert GEMM, the router's load-balancing and z losses (megatron's
    ``moe_router_load_balancing_type`` is "none" when the coefficient is 0) and the capacity factor
    (null: no token dropped, the trainer must see the tokens the sampler saw)."""
    mc = megatron_config
    aux = float(mc.moe_aux_loss_coeff)
    return dict(
        expert_model_parallel_size=mc.expert_model_parallel_size,
        expert_tensor_parallel_size=mc.etp,
        moe_token_dispatcher_type=mc.moe_token_dispatcher,
        moe_grouped_gemm=mc.moe_grouped_gemm,
        moe_aux_loss_coeff=aux,
        moe_router_load_balancing_type=mc.moe_aux_loss_type if aux > 0 else "none",
        moe_z_loss_coeff=float(mc.moe_z_loss_coeff) or None,
        moe_expert_capacity_factor=mc.moe_expert_capacity_factor,
    )


def _expert_weights(need: Callable[[str], Tensor], has: Callable[[str], bool], hf: str, e: int) -> tuple[Tensor, Tensor, Tensor]:
    """(gate [F, H], up [F, H], down [H, F]) of global expert ``e`` of the layer named ``hf``, from the
    checkpoint's per-expert names or transformers' fused in-memory ones."""
    if has(hf + "mlp.experts.gate_up_proj"):
        gate, up = need(hf + "mlp.experts.gate_up_proj")[e].chunk(2, dim=0)
        return gate, up, need(hf + "mlp.experts.down_proj")[e]
    x = f"{hf}mlp.experts.{e}."
    return need(x + "gate_proj.weight"), need(x + "up_proj.weight"), need(x + "down_proj.weight")


def _split(t: Tensor, dim: int, rank: int, size: int) -> Tensor:
    if size == 1:
        return t
    if t.shape[dim] % size:
        raise ValueError(f"cannot split a tensor of shape {tuple(t.shape)} in {size} expert-TP shards on dim {dim}")
    return t.chunk(size, dim=dim)[rank]


def layer_to_mcore(need: Callable[[str], Tensor], has: Callable[[str], bool], hf: str, mc: str, hf_config: Any, *,
                   ep_rank: int = 0, ep_size: int = 1, etp_rank: int = 0, etp_size: int = 1,
                   grouped_gemm: bool = False) -> dict[str, Tensor]:
    """The router and this EP rank's experts of one layer (HF prefix ``hf``, megatron prefix ``mc``)."""
    e_all = num_experts(hf_config)
    local = e_all // ep_size
    out = {mc + "mlp.router.weight": need(hf + "mlp.gate.weight")}
    if has(hf + "mlp.experts.gate_up_proj"):  # fused: each [E, ...] tensor read once, not once per expert
        fused = {hf + "mlp.experts.gate_up_proj": need(hf + "mlp.experts.gate_up_proj"),
                 hf + "mlp.experts.down_proj": need(hf + "mlp.experts.down_proj")}
        need, has = fused.__getitem__, fused.__contains__
    for le in range(local):
        gate, up, down = _expert_weights(need, has, hf, ep_rank * local + le)
        fc1 = torch.cat([_split(gate, 0, etp_rank, etp_size), _split(up, 0, etp_rank, etp_size)], dim=0)
        fc2 = _split(down, 1, etp_rank, etp_size)
        if grouped_gemm:
            out[f"{mc}mlp.experts.linear_fc1.weight{le}"], out[f"{mc}mlp.experts.linear_fc2.weight{le}"] = fc1, fc2
        else:
            x = f"{mc}mlp.experts.local_experts.{le}."
            out[x + "linear_fc1.weight"], out[x + "linear_fc2.weight"] = fc1, fc2
    return out


def expert_of(sub: str) -> tuple[int, str] | None:
    """(local expert, ``linear_fc1`` | ``linear_fc2``) of a megatron per-layer name, None for others."""
    m = _SEQUENTIAL.match(sub)
    if m:
        return int(m.group(1)), m.group(2)
    m = _GROUPED.match(sub)
    if m:
        return int(m.group(2)), m.group(1)
    return None


def tensors_from_mcore(sub: str, shards: Sequence[Tensor], hf: str, hf_config: Any, *, ep_rank: int = 0,
                       ep_size: int = 1) -> list[tuple[str, Tensor]] | None:
    """HF (name, tensor) pairs of one megatron MoE tensor (``shards``: its expert-TP shards in rank
    order) of EP rank ``ep_rank``; None when ``sub`` is not a MoE tensor."""
    if sub == "mlp.router.weight":
        return [(hf + "mlp.gate.weight", shards[0])]
    found = expert_of(sub)
    if found is None:
        return None
    le, which = found
    e = ep_rank * (num_experts(hf_config) // ep_size) + le
    x = f"{hf}mlp.experts.{e}."
    if which == "linear_fc2":
        return [(x + "down_proj.weight", torch.cat(list(shards), dim=1) if len(shards) > 1 else shards[0])]
    halves = [s.chunk(2, dim=0) for s in shards]
    return [(x + "gate_proj.weight", torch.cat([h[0] for h in halves], dim=0)),
            (x + "up_proj.weight", torch.cat([h[1] for h in halves], dim=0))]
