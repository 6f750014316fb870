"""Building the megatron-core models: parallel state, layer spec, actor ``GPTModel`` and critic.

Both roles' ``output_layer`` is replaced by a head of one kind, ``SelectedPositionsHead``: it keeps
megatron's call convention ``(hidden [s, b, H], weight=None, runtime_gather_output=None) -> (out, None)``
so the trunk, checkpointing and pipeline code stay megatron's own, gathers a sequence-parallel stream,
keeps the positions ``HeadInputs`` names for the micro-batch in flight and projects only those:
``LogprobHead`` (actor) returns the log-probs of the targets from the vocab-parallel output weight, never
the logits; ``ValueHead`` (critic) returns the values of its [1, hidden] + bias head, computed in float32
(replicated over TP). The weights keep their names (``output_layer.weight`` / ``output_layer.bias``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor, nn

from tempo_mega.backends.megatron import convert_moe as moe
from tempo_mega.backends.megatron.config import MegatronConfig
from tempo_mega.backends.megatron.convert import gpt_model_kwargs, to_transformer_config
from tempo_mega.backends.megatron.logprobs import vocab_parallel_logprobs
from tempo_mega.backends.megatron.moe import RouterInputs, check_moe_runtime, router_builder

log = logging.getLogger(__name__)

_SPEC_LOGGED = False


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install raises RuntimeError, not ImportError
        return False
    return True


class LocalRMSNorm(nn.RMSNorm):
    """The local spec's RMSNorm (megatron's ``WrappedTorchNorm`` refuses sequence parallel): torch's
    RMSNorm in ``params_dtype``; with sequence parallel its weight is marked ``sequence_parallel``, so
    that ``finalize_model_grads`` sums its partial gradients (each TP rank normed its part of the
    sequence) over TP, as Transformer Engine's norms are marked."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **unused: Any):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        if config.sequence_parallel:
            self.weight.sequence_parallel = True


class AllGatherCPAttention(DotProductAttention):
    """The local spec's core attention with context parallelism (megatron's own supports CP only
    through Transformer Engine): the keys and values of every CP rank are gathered (their gradients
    reduce-scattered back), and this rank's queries attend to them under the block-diagonal causal
    mask the backend builds over the gathered order (``PackedMicro.block_causal_mask``). Memory grows
    with the whole stream's length; on GPUs Transformer Engine's ring attention is the one to use."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        single = copy.copy(config)  # the parent refuses CP > 1; it uses the config for nothing CP-related
        single.context_parallel_size = 1
        super().__init__(single, *args, **kwargs)
        self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *args: Any,
                **kwargs: Any) -> Tensor:
        key = tensor_parallel.gather_from_sequence_parallel_region(key, group=self.cp_group)
        value = tensor_parallel.gather_from_sequence_parallel_region(value, group=self.cp_group)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


def layer_spec(*, use_te: bool | None = None, context_parallel: bool = False, num_experts: int | None = None,
               grouped_gemm: bool = False, router: Any = None):
    """(spec, te_layout): the Transformer Engine spec when TE imports (or ``use_te``), else the local
    spec with ``LocalRMSNorm`` for every norm (sequence parallel included; no FP8) and, with
    ``context_parallel``, ``AllGatherCPAttention``. With ``num_experts``, the MLP is megatron's MoE layer
    (router + experts, sequential or ``grouped_gemm``; no shared expert), its router built by ``router``
    (``moe.router_builder``; None: megatron's ``TopKRouter``). Said once in the log."""
    global _SPEC_LOGGED
    te = transformer_engine_available() if use_te is None else use_te
    if not _SPEC_LOGGED:
        log.info("megatron layer spec: %s", "transformer_engine" if te else
                 "local (transformer_engine not importable: no FP8, no THD attention)")
        _SPEC_LOGGED = True
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm,
                                                          qk_layernorm=True)
        if num_experts and router is not None:
            spec.submodules.mlp.submodules.router = router
        return spec, True
    if num_experts:
        from megatron.core.transformer.moe import moe_utils

        # megatron-core 0.16 reads moe_utils.te_general_gemm in the router whether or not TE imported,
        # and defines it only when it did: without TE it is "none here", which the router then handles
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm, qk_layernorm=True,
                                    normalization="RMSNorm")
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    if num_experts and router is not None:
        layer.mlp.submodules.router = router
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalRMSNorm
    attention.q_layernorm = attention.k_layernorm = LocalRMSNorm
    if context_parallel:
        attention.core_attention = AllGatherCPAttention
    return spec, False


def init_parallel(megatron_config: MegatronConfig, *, seed: int = 0) -> None:
    """torch.distributed (from the torchrun env if not yet up; a 1-process gloo group otherwise) and
    megatron's parallel state with the configured sizes; model-parallel RNG seeded."""
    mc = megatron_config
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    mc.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_world_size())
        want = (mc.tensor_parallel_size, mc.pipeline_parallel_size, mc.expert_model_parallel_size, mc.etp)
        if have != want:
            raise ValueError(f"megatron parallel state already initialized with TP, PP, EP, ETP = {have}, config "
                             f"asks megatron.tensor_parallel_size={want[0]}, megatron.pipeline_parallel_size="
                             f"{want[1]}, megatron.expert_model_parallel_size={want[2]}, "
                             f"megatron.expert_tensor_parallel_size={want[3]}")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=mc.tensor_parallel_size,
            pipeline_model_parallel_size=mc.pipeline_parallel_size,
            virtual_pipeline_model_parallel_size=mc.vpp,
            context_parallel_size=mc.context_parallel_size,
            expert_model_parallel_size=mc.expert_model_parallel_size,
            expert_tensor_parallel_size=mc.etp,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


class HeadInputs:
    """What the backend tells a model's head about the micro-batch in flight, for one forward
    (``selecting``): the positions of the packed stream whose outputs are wanted, the actor's target
    tokens there and the temperature. Outside ``selecting`` a head projects every position (the actor
    then returns plain logits)."""

    def __init__(self) -> None:
        self.positions: Tensor | None = None
        self.targets: Tensor | None = None
        self.temperature = 1.0

    @contextlib.contextmanager
    def selecting(self, positions: Tensor, targets: Tensor | None = None, *,
                  temperature: float = 1.0) -> Iterator[None]:
        self.positions, self.targets, self.temperature = positions, targets, temperature
        try:
            yield
        finally:
            self.positions, self.targets, self.temperature = None, None, 1.0


class SelectedPositionsHead(nn.Module):
    """A model's ``output_layer``: gathers a sequence-parallel stream (the gather's backward keeps this
    rank's part), keeps the positions ``inputs`` names and hands them to ``project``."""

    def __init__(self, inputs: HeadInputs, *, sequence_parallel: bool):
        super().__init__()
        self.inputs, self.gather_sequence = inputs, sequence_parallel

    def forward(self, hidden: Tensor, weight: Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[Tensor, None]:
        if self.gather_sequence:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        if self.inputs.positions is not None:
            hidden = hidden[self.inputs.positions]  # [T, 1, H] -> [N, 1, H]
        return self.project(hidden, weight, runtime_gather_output), None

    def project(self, hidden: Tensor, weight: Tensor | None, runtime_gather_output: bool | None) -> Tensor:
        raise NotImplementedError


class LogprobHead(SelectedPositionsHead):
    """The actor's head: megatron's vocab-parallel output layer, whose weight (own, or the tied
    embedding megatron passes as ``weight``) it keeps under the same name and sharding. At selected
    positions it returns the float32 log-probs [N, 1, 1] of ``inputs.targets`` at ``inputs.temperature``
    (``vocab_parallel_logprobs``, ``chunk_tokens`` rows of logits at a time); otherwise the layer's
    logits."""

    def __init__(self, layer: nn.Module, inputs: HeadInputs, *, sequence_parallel: bool, chunk_tokens: int):
        super().__init__(inputs, sequence_parallel=sequence_parallel)
        self.weight = layer.weight  # the same Parameter (None when tied on a stage with the embedding)
        layer.sequence_parallel = False  # the stream comes gathered
        self._layer = [layer]  # a list: not a submodule, so the weight has one name, output_layer.weight
        self.chunk_tokens = chunk_tokens

    def project(self, hidden: Tensor, weight: Tensor | None, runtime_gather_output: bool | None) -> Tensor:
        if self.inputs.positions is None:
            return self._layer[0](hidden, weight=weight, runtime_gather_output=runtime_gather_output)[0]
        weight = self.weight if weight is None else weight
        lp = vocab_parallel_logprobs(hidden[:, 0], weight, self.inputs.targets, self.inputs.temperature,
                                     self.chunk_tokens)
        return lp[:, None, None]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return self._layer[0].sharded_state_dict(prefix, sharded_offsets, metadata)

    def get_extra_state(self) -> Any:
        return self._layer[0].get_extra_state()

    def set_extra_state(self, state: Any) -> None:
        self._layer[0].set_extra_state(state)


class ValueHead(SelectedPositionsHead):
    """The critic's head: ``nn.Linear(hidden, 1)`` computed in float32 after the decoder's final RMSNorm,
    values [N, 1, 1]. Its parameters are in the model's dtype (``dtype``), as every other parameter:
    megatron-core's optimizers keep their float32 master copies, and their checkpoints hold no float32
    parameter of a bf16 model (both the distributed and the plain mixed-precision optimizer map their
    state to the parameters by position among the 16-bit ones, and a float32 parameter among them breaks
    that mapping: a bf16 critic could not be checkpointed). With ``norm_weight`` given (the decoder's
    ``final_layernorm`` is then a ``DeferredNorm``), the norm runs here, fused with the projection by
    ``tempo_mega.kernels.fused_value_head`` (Triton with ``impl="auto"`` on CUDA, its torch reference
    otherwise; either upcasts the weights): on the selected positions only, never materializing the
    normed rows."""

    def __init__(self, hidden_size: int, inputs: HeadInputs | None = None, *, sequence_parallel: bool = False,
                 seed: int = 0, norm_weight: nn.Parameter | None = None, eps: float = 1e-6, impl: str = "torch",
                 dtype: torch.dtype = torch.float32):
        super().__init__(inputs or HeadInputs(), sequence_parallel=sequence_parallel)
        from tempo_mega.models.critic import init_value_head

        head = init_value_head(hidden_size, seed)  # the torch backend's ValueHeadModel init
        self.weight = nn.Parameter(head["weight"].to(dtype))
        self.bias = nn.Parameter(head["bias"].to(dtype))
        self._norm_weight = [norm_weight]  # a list: not registered here, it stays decoder.final_layernorm's
        self.eps, self.impl = eps, impl

    def project(self, hidden: Tensor, weight: Tensor | None, runtime_gather_output: bool | None) -> Tensor:
        norm_weight = self._norm_weight[0]
        if norm_weight is not None:
            from tempo_mega.kernels import fused_value_head

            values = fused_value_head(hidden, norm_weight, self.weight[0], self.bias, eps=self.eps, impl=self.impl)
            return values.float()[..., None]
        with torch.autocast(hidden.device.type, enabled=False):
            return nn.functional.linear(hidden.float(), self.weight.float(), self.bias.float())


class DeferredNorm(nn.Module):
    """Stands in for the critic decoder's final RMSNorm, whose work ``ValueHead`` does (fused, on the
    selected positions): the identity, holding the norm's weight under the same name so checkpoints
    and conversion do not change. The norm now runs after the sequence is gathered, identically on
    every TP rank, so its weight is no longer a sequence-parallel partial-gradient parameter."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.weight.sequence_parallel = False

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden


def build_model(hf_config: Any, megatron_config: MegatronConfig, *, role: str = "actor", seed: int = 0,
                use_te: bool | None = None, vp_stage: int | None = None, use_kernels: bool = False,
                head_inputs: HeadInputs | None = None, router_inputs: RouterInputs | None = None,
                **config_overrides: Any) -> tuple[GPTModel, bool]:
    """(model of this rank's PP stage, or of its virtual chunk ``vp_stage`` with VPP; te_layout).
    ``init_parallel`` must have run. Weights are megatron's random init (load HF weights with
    ``convert.hf_to_mcore_state_dict``). The last stage's ``output_layer`` is the role's head (module
    docstring), reading ``head_inputs`` (a fresh one, selecting nothing, when None). The critic's final
    norm and value head run as one ``fused_value_head`` (the Triton kernel with ``use_kernels``, its
    torch reference otherwise). A mixture of experts routes with ``MoERouter``, its losses weighted by
    ``router_inputs`` (``moe.py``)."""
    if role not in ("actor", "critic"):
        raise ValueError(f"build_model: role must be 'actor' or 'critic', got {role!r}")
    mc = megatron_config
    if mc.vpp and vp_stage is None:
        raise ValueError("build_model: megatron.virtual_pipeline_parallel_size is set, pass vp_stage "
                         "(or use build_model_chunks)")
    experts = moe.num_experts(hf_config) if moe.is_moe(hf_config) else None
    grouped = bool(config_overrides.get("moe_grouped_gemm", mc.moe_grouped_gemm))
    router = router_builder(router_inputs or RouterInputs()) if experts else None
    spec, te_layout = layer_spec(use_te=use_te, context_parallel=mc.context_parallel_size > 1, num_experts=experts,
                                 grouped_gemm=grouped, router=router)
    if not te_layout:
        if mc.fp8 != "none":
            raise ValueError(f"megatron.fp8={mc.fp8!r} needs Transformer Engine, which does not import here")
    if mc.fusions and not (te_layout and torch.cuda.is_available()):
        raise ValueError("megatron.fusions=true needs a GPU and Transformer Engine (its fused RoPE and "
                         "weight-gradient kernels); set it false here")
    config = to_transformer_config(hf_config, mc, **config_overrides)
    if experts:
        check_moe_runtime(config, te_layout=te_layout)
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if not te_layout:  # the block's final norm too (megatron would pick its own for a layer spec)
        from megatron.core.transformer.transformer_block import (
            TransformerBlockSubmodules,
            get_num_layers_to_build,
        )

        spec = TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                          layer_norm=LocalRMSNorm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTModel(config=config, transformer_layer_spec=spec, pre_process=first, post_process=last,
                         vp_stage=vp_stage, **gpt_model_kwargs(hf_config, role=role))
    if experts:
        mark_expert_parameters(model)
    if model.post_process:
        inputs, sp = head_inputs or HeadInputs(), config.sequence_parallel
        if role == "critic":
            norm = model.decoder.final_layernorm
            model.output_layer = ValueHead(config.hidden_size, inputs, sequence_parallel=sp, seed=seed,
                                           norm_weight=norm.weight, eps=config.layernorm_epsilon,
                                           impl="auto" if use_kernels else "torch", dtype=config.params_dtype)
            model.decoder.final_layernorm = DeferredNorm(norm.weight)
        else:
            model.output_layer = LogprobHead(model.output_layer, inputs, sequence_parallel=sp,
                                             chunk_tokens=megatron_config.logprob_chunk_tokens)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, te_layout


def mark_expert_parameters(model: nn.Module) -> None:
    """Mark every expert weight as megatron marks them under expert parallelism (``allreduce=False``),
    at EP=1 too: megatron-core marks them only when EP > 1, and then its optimizer is a chain of a
    dense and an expert optimizer, its distributed checkpoint ``chained_0`` / ``chained_1``; at EP=1
    the experts would be dense parameters of a single optimizer, and a checkpoint saved at EP=2 would
    not load at EP=1. Their gradients are reduced over the expert data-parallel group, which is the
    data-parallel (x context-parallel) group at EP=1."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for module in model.modules():
        if isinstance(module, MoELayer):
            for p in module.experts.parameters():
                p.allreduce = False


def build_model_chunks(hf_config: Any, megatron_config: MegatronConfig, *, role: str = "actor", seed: int = 0,
                       use_te: bool | None = None, use_kernels: bool = False, head_inputs: HeadInputs | None = None,
                       router_inputs: RouterInputs | None = None,
                       **config_overrides: Any) -> tuple[list[GPTModel], bool]:
    """The model chunks of this rank: one per virtual pipeline stage (one without VPP), their heads
    reading one ``head_inputs`` and their routers one ``router_inputs``."""
    head_inputs = head_inputs or HeadInputs()
    vpp = megatron_config.vpp
    stages: list[int | None] = list(range(vpp)) if vpp else [None]
    chunks, te_layout = [], False
    for v in stages:
        model, te_layout = build_model(hf_config, megatron_config, role=role, seed=seed, use_te=use_te,
                                       vp_stage=v, use_kernels=use_kernels, head_inputs=head_inputs,
                                       router_inputs=router_inputs, **config_overrides)
        chunks.append(model)
    return chunks, te_layout
