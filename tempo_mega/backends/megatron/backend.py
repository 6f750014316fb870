"""``MegatronBackend``: the TrainBackend of one role on megatron-core (TP, PP with virtual stages, DP
with or without the distributed optimizer).

Same contract as ``TorchBackend`` (see torch.py): the log-prob of response token t and the value V_t
are read from the hidden state just before response token t. Every micro-batch runs packed: the real
tokens of its rows in one stream, no padding (THD with sequence boundaries under Transformer Engine, a
block-diagonal causal mask with the local spec). Only the response positions go through the head
(``model.py``: the backend names them, with the targets and the temperature, in ``HeadInputs`` for
each forward), the logits stay vocab-parallel and the log-probs come from
``tensor_parallel.vocab_parallel_cross_entropy``: the full vocabulary is never gathered.

Training runs on megatron's own machinery: the model chunks are wrapped in megatron's
``DistributedDataParallel`` (fp32 gradient buffers), the micro-batches of a mini-batch go through
``get_forward_backward_func()`` (no pipelining, 1F1B, or interleaved 1F1B with virtual stages;
micro-batch shapes vary, ``variable_seq_lengths``), ``finalize_model_grads`` reduces the gradients
(DP all-reduce or reduce-scatter, q/k-norm and sequence-parallel norms over TP, tied embeddings over
the first and last stages), and ``get_megatron_optimizer`` steps (fp32 master weights for bf16 models,
``use_distributed_optimizer`` shards them over DP).

Micro-batch weighting is the torch backend's (``backends/base.py``): each micro-batch's loss is scaled
by its share of the whole mini-batch (``weight_units / denom`` over all DP ranks), megatron's own
division by the number of micro-batches and by DP is switched off (``calculate_per_token_loss`` with a
``finalize`` that is given no token count), so the update equals the single-process one.

Data parallel: every rank is given the whole batch; DP rank d works on its contiguous share of each
mini-batch's rows. Outputs of no-grad passes are assembled on the last PP stage, broadcast over the
pipeline and summed over DP (other ranks' rows are 0).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from tempo_mega.algo.losses import LossSpec
from tempo_mega.backends.base import (
    LossFn,
    OptimConfig,
    bind_loss,
    optimizer_passes,
    weight_units,
)
from tempo_mega.backends.megatron.checkpointing import _Checkpoints
from tempo_mega.backends.megatron.config import MegatronConfig
from tempo_mega.backends.megatron.convert_moe import is_moe
from tempo_mega.backends.megatron.logprobs import _SumOverGroup
from tempo_mega.backends.megatron.model import HeadInputs, build_model_chunks, init_parallel
from tempo_mega.backends.megatron.moe import RouterInputs, moe_step_metrics, reset_step_counts
from tempo_mega.backends.megatron.packing import PackedMicro, pack_micro_batch, stream_length
from tempo_mega.backends.megatron.weights import _Weights
from tempo_mega.batch import RolloutBatch

log = logging.getLogger(__name__)

ROLES = ("actor", "critic")


@dataclass
class _Micro:
    """One micro-batch of a schedule: its rows, its loss weight, and whether it is filler (a pipeline
    schedule needs >= 1 micro-batch per rank, the interleaved one a multiple of PP; filler rows are
    real rows whose loss is multiplied by 0, so their gradient is exactly 0)."""

    batch: RolloutBatch
    weight: float = 1.0
    filler: bool = False
    tokens: int | None = None  # length of the packed stream the micro-batch is padded to


class MegatronBackend(_Checkpoints, _Weights):
    """Train backend for one role (satisfies ``TrainBackend``). ``hf_config``: a Qwen3 config, dense or
    mixture of experts (``qwen3_moe``: expert parallel per ``megatron.expert_*``, ``moe.py``);
    ``hf_state_dict``: HF-named weights to start from (``Qwen3ForCausalLM`` names for the actor, plus
    ``value_head.*`` for the critic; without them the critic's head is freshly initialized), or None
    for megatron's random init. ``use_kernels`` (the trainer's ``kernels.enable``, on both roles): the
    critic's final norm + value head through the Triton ``fused_value_head`` (its torch reference
    otherwise), and, read by the controller, the losses through the packed ``gspo_loss`` /
    ``seq_clipped_value_loss`` kernels, as on the torch backend."""

    def __init__(self, role: str, hf_config: Any, megatron_config: MegatronConfig | None = None,
                 optim: OptimConfig | None = None, *, hf_state_dict: Mapping[str, Tensor] | None = None,
                 temperature: float = 1.0, seed: int = 0, use_te: bool | None = None, use_kernels: bool = False,
                 routing_replay: bool = False):
        if role not in ROLES:
            raise ValueError(f"MegatronBackend: role must be one of {ROLES}, got {role!r}")
        if temperature <= 0:
            raise ValueError(f"MegatronBackend: temperature must be positive, got {temperature}")
        mc = (megatron_config or MegatronConfig()).resolved()  # params_dtype null: bfloat16 here
        self.role, self.hf_config, self.megatron_config = role, hf_config, mc
        self.optim, self.temperature, self.seed = optim or OptimConfig(), temperature, seed
        init_parallel(mc, seed=seed)
        self.use_kernels = use_kernels
        # Megatron's random init runs even when starting weights overwrite it: megatron-core 0.16 sets the
        # tensor-parallel attributes of a weight inside its init, so perform_initialization=False leaves
        # TP weights unmarked (found by the 2-rank test: the export stopped gathering their shards).
        self.heads = HeadInputs()  # what every chunk's head is told about the micro-batch in flight
        self.routers = RouterInputs()  # and, for a mixture of experts, every router (moe.py)
        self.moe = is_moe(hf_config)
        if routing_replay and not (self.moe and role == "actor"):
            raise ValueError("MegatronBackend: routing replay (algo.routing_replay=r3) replays the sampler's experts "
                             f"in the actor of a mixture of experts; this is the {role} of a "
                             f"{'mixture of experts' if self.moe else 'dense model'}")
        self.routing_replay = routing_replay
        self.chunks, self.te_layout = build_model_chunks(hf_config, mc, role=role, seed=seed, use_te=use_te,
                                                         use_kernels=use_kernels, head_inputs=self.heads,
                                                         router_inputs=self.routers)
        # Micro-batch shapes vary and are sent ahead of the activations. Not with virtual stages on
        # PP=2: the interleaved schedule sends to and receives from both neighbours at once, which are
        # the same rank there, and megatron's batched exchange (of the shapes, and by default of the
        # tensors) cannot tell the two directions apart. There every micro-batch of a schedule is
        # padded to one shape, and the unbatched p2p path (two groups) is used.
        self._fixed_shapes = bool(mc.vpp) and mc.pipeline_parallel_size == 2
        for c in self.chunks:  # set after construction: the config's own checks are about MoE dispatchers
            c.config.variable_seq_lengths = not self._fixed_shapes
            if self._fixed_shapes:
                c.config.batch_p2p_comm = False
            c.config.calculate_per_token_loss = True  # we weight the micro-batches (module docstring)
        self.device = next(p for c in self.chunks for p in c.parameters()).device
        if hf_state_dict is not None:
            self._load_hf_into_chunks(hf_state_dict)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=mc.use_distributed_optimizer)
        self.ddp = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in self.chunks]
        for c in self.chunks:
            c.config.finalize_model_grads_func = _finalize_without_token_scaling
        o = self.optim
        dtype = getattr(torch, mc.params_dtype)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.lr, weight_decay=o.weight_decay,
                            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps,
                            clip_grad=max(o.grad_clip, 0.0), bf16=dtype == torch.bfloat16,
                            fp16=dtype == torch.float16, params_dtype=dtype,
                            use_distributed_optimizer=mc.use_distributed_optimizer),
            self.ddp)
        self._sub_optimizers = list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))
        # the Adam moments now rather than at the first step: a colocated SGLang engine, launched after the
        # models are built, sizes its KV cache against the trainer's steady-state memory, not less
        self._init_optimizer_state()
        self.num_train_steps = 0
        self.num_optimizer_steps = 0
        for chunk in self.chunks:
            chunk.eval()

    # ------------------------------------------------------------------ groups
    @property
    def tp_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def tp_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    @property
    def pp_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    @property
    def pp_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    @property
    def cp_rank(self) -> int:
        return parallel_state.get_context_parallel_rank()

    @property
    def cp_size(self) -> int:
        return parallel_state.get_context_parallel_world_size()

    @property
    def ep_rank(self) -> int:
        return parallel_state.get_expert_model_parallel_rank()

    @property
    def ep_size(self) -> int:
        return parallel_state.get_expert_model_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    @property
    def is_last_stage(self) -> bool:
        return parallel_state.is_pipeline_last_stage()

    def _pp_last_global_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_last_rank()

    # ------------------------------------------------------------------ forward
    def forward_logprobs(self, batch: RolloutBatch, temperature: float | None = None) -> Tensor:
        """[B, L] float32 log-probs of the response tokens under log_softmax(logits / temperature)
        (None: the temperature the backend was built with, rollout.temperature), 0 at masked positions.
        No gradient. A collective over all ranks."""
        if self.role != "actor":
            raise ValueError("forward_logprobs: this backend is the critic; use forward_values")
        return self._forward_no_grad(batch, self.temperature if temperature is None else temperature)

    def forward_values(self, batch: RolloutBatch) -> Tensor:
        """[B, L] float32 values V_t read before response token t, 0 at masked positions. No gradient.
        A collective over all ranks."""
        if self.role != "critic":
            raise ValueError("forward_values: this backend is the actor; use forward_logprobs")
        return self._forward_no_grad(batch)

    def _forward_no_grad(self, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
        out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=self.device)
        rows = self._dp_rows(batch.batch_size)
        part = batch.select(rows)
        micros = [_Micro(m) for m in part.split_by_tokens(self.optim.max_tokens_per_micro_batch)] if len(rows) else []
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            results = self._schedule(micros, batch, loss_fn=None, forward_only=True, temperature=temperature)
        if self.is_last_stage:
            start = int(rows[0]) if len(rows) else 0
            for micro, vals in zip(micros, results):  # fillers come last
                out[start : start + micro.batch.batch_size, : micro.batch.response_len] = vals
                start += micro.batch.batch_size
        if self.pp_size > 1:
            dist.broadcast(out, src=self._pp_last_global_rank(), group=parallel_state.get_pipeline_model_parallel_group())
        if self.dp_size > 1:  # rows of the other DP ranks are zero here: a sum gathers them
            dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        return out.to(batch.response_mask.device)

    def _dp_rows(self, n: int) -> Tensor:
        return torch.tensor_split(torch.arange(n), self.dp_size)[self.dp_rank]

    def _schedule(self, micros: list[_Micro], source: RolloutBatch, *, loss_fn: LossFn | None,
                  forward_only: bool, temperature: float) -> list[Any]:
        """Run megatron's forward(-backward) schedule over ``micros`` (filler appended where the
        schedule needs it, taken from ``source``'s first row), the actor's log-probs at ``temperature``;
        returns, on the last PP stage, one entry per real micro-batch: the [b, L'] outputs (``loss_fn``
        None) or (loss, metrics, weight)."""
        micros = list(micros)
        # expert parallel: the MoE layers are collectives over EP ranks, which hold different DP ranks'
        # rows: every DP rank runs as many micro-batches, as long (the allgather dispatcher needs it)
        ep_sync = self.moe and self.ep_size > 1 and self.dp_size > 1
        need = max(1, self._max_over_dp([len(micros)])[0] if ep_sync else 1)
        if self.megatron_config.vpp:  # interleaved 1F1B: a multiple of PP, at least PP
            need = max(self.pp_size, -(-max(need, len(micros)) // self.pp_size) * self.pp_size)
        while len(micros) < need:
            micros.append(_Micro(source.select(torch.arange(1)), weight=0.0, filler=True))
        # sequence parallel splits the packed stream over TP (a multiple of TP tokens); FP8 GEMMs want
        # every rank's token count a multiple of 16
        mult = self.tp_size if self.chunks[0].config.sequence_parallel else 1
        mult *= 16 if self.megatron_config.fp8 != "none" else 1
        mult *= 2 * self.cp_size if self.cp_size > 1 else 1  # CP: 2 chunks per rank, as many tokens each
        lengths = [stream_length(m.batch, cp_size=self.cp_size, per_sequence=self.te_layout) for m in micros]
        if ep_sync:
            lengths = self._max_over_dp(lengths)
        tokens = -(-max(lengths) // mult) * mult
        for m, n in zip(micros, lengths):
            m.tokens = tokens if self._fixed_shapes else -(-n // mult) * mult
        step = functools.partial(self._forward_step, loss_fn=loss_fn, temperature=temperature)
        n_chunks = len(self.ddp)
        data = [iter(micros) for _ in range(n_chunks)] if n_chunks > 1 else iter(micros)
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data, model=self.ddp if n_chunks > 1 else self.ddp[0],
            num_microbatches=len(micros), seq_length=tokens, micro_batch_size=1, forward_only=forward_only)
        return [r["result"] for r in store if not r["filler"]] if self.is_last_stage else []

    def _max_over_dp(self, values: list[int]) -> list[int]:
        """Element-wise max of ``values`` over the DP group (the same length on every rank)."""
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        return [int(x) for x in t.tolist()]

    def _forward_step(self, data_iterator, model, *, loss_fn: LossFn | None, temperature: float):
        """megatron's forward_step_func: one micro-batch through one model chunk."""
        micro: _Micro = next(data_iterator)
        batch, dev = micro.batch, self.device
        pm = pack_micro_batch(batch, tokens=micro.tokens, cp_size=self.cp_size, cp_rank=self.cp_rank,
                              per_sequence=self.te_layout)
        mask = batch.response_mask.to(dev).bool()
        owned = pm.owned.to(dev)
        targets = batch.response_ids.to(dev)[mask][owned] if self.role == "actor" else None
        extra = self._attention_kwargs(pm)
        replay = None
        if self.moe:
            extra["padding_mask"] = self._padding_mask(pm, model)
            if self.routing_replay:
                replay = self._replay_targets(batch, pm)
        with self.heads.selecting(pm.select.to(dev), targets, temperature=temperature), \
                self.routers.weighting(micro.weight, tokens=int(batch.attention_mask.sum()), count=not micro.filler,
                                       replay=replay):
            out = model(input_ids=pm.input_ids.to(dev), position_ids=pm.position_ids.to(dev), **extra)
        return out, functools.partial(self._loss, micro, mask, owned, loss_fn)

    def _attention_kwargs(self, pm: PackedMicro) -> dict[str, Any]:
        """How attention learns the sequence boundaries of the packed stream: THD ``PackedSeqParams``
        under Transformer Engine (which splits the sequences over CP itself), the equivalent
        block-diagonal causal mask on the local spec (over all CP ranks' tokens, which its attention
        gathers)."""
        dev = self.device
        if self.te_layout:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu, cu_pad = pm.cu_seqlens.to(dev), pm.cu_seqlens_padded.to(dev)
            return {"attention_mask": None, "packed_seq_params": PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                cu_seqlens_kv_padded=cu_pad, max_seqlen_q=pm.max_seqlen, max_seqlen_kv=pm.max_seqlen)}
        return {"attention_mask": pm.block_causal_mask().to(dev)}

    def _replay_targets(self, batch: RolloutBatch, pm: PackedMicro) -> dict[int, tuple[Tensor, Tensor]]:
        """The sampler's experts for this rank's router tokens of the micro-batch, per layer number:
        (target [tokens, k], valid [tokens]), laid out as the packed stream (this CP rank's part, this TP
        rank's sequence-parallel part); a row's last token and the padding are not valid."""
        if batch.routed_experts is None:
            raise ValueError("MegatronBackend: routing replay is on (algo.routing_replay=r3) but the batch carries "
                             "no routed experts: the sampler must return them (SamplingParams.return_routed_experts)")
        cfg = self.chunks[0].config
        layers, k = cfg.num_layers, cfg.moe_router_topk
        total = int(pm.segment.numel())
        target = torch.zeros(total, layers, k, dtype=torch.long)
        valid = torch.zeros(total, dtype=torch.bool)
        rows, flags = [], []
        for t in batch.routed_experts:
            if tuple(t.shape[1:]) != (layers, k):
                raise ValueError(f"routing replay: the batch's routed experts are [tokens, {', '.join(map(str, t.shape[1:]))}] "
                                 f"per token, the model routes {layers} layers x top-{k}")
            rows += [t.long(), torch.zeros(1, layers, k, dtype=torch.long)]  # the last token: never routed
            flags += [torch.ones(t.shape[0], dtype=torch.bool), torch.zeros(1, dtype=torch.bool)]
        target[pm.real_pos] = torch.cat(rows)
        valid[pm.real_pos] = torch.cat(flags)
        target, valid = target[pm.local_index], valid[pm.local_index]
        if cfg.sequence_parallel:  # the routers see this TP rank's contiguous part of the stream
            target, valid = target.tensor_split(self.tp_size)[self.tp_rank], valid.tensor_split(self.tp_size)[self.tp_rank]
        target, valid = target.to(self.device), valid.to(self.device)
        return {n + 1: (target[:, n], valid) for n in range(layers)}

    def _padding_mask(self, pm: PackedMicro, model) -> Tensor:
        """[1, t] True where the stream holds no row's token, for the MoE routers (``moe.py``). megatron
        splits it over sequence-parallel ranks on the first stage only; later stages get this rank's
        part."""
        mask = pm.padding.to(self.device)
        first = getattr(model, "module", model).pre_process
        if self.chunks[0].config.sequence_parallel and not first:
            mask = mask.tensor_split(self.tp_size, dim=1)[self.tp_rank]
        return mask

    def _loss(self, micro: _Micro, mask: Tensor, owned: Tensor, loss_fn: LossFn | None, output: Tensor):
        """megatron's loss_func on the last stage: (scalar to backward, token count (unused: we weight
        ourselves), what to keep). With CP every rank holds the outputs of its own tokens: they are
        summed into the whole micro-batch's on every rank (each computes the same loss and sends the
        gradient of its own outputs back)."""
        vals = output[0, :, 0].float()  # [1, n, 1]: log-probs (actor) or values (critic)
        if self.cp_size > 1:
            mine = torch.zeros(owned.shape, dtype=vals.dtype, device=self.device).masked_scatter(owned, vals)
            vals = _SumOverGroup.apply(mine, parallel_state.get_context_parallel_group())
        full = torch.zeros(mask.shape, dtype=vals.dtype, device=self.device).masked_scatter(mask, vals)
        one = torch.ones((), dtype=torch.int, device=self.device)
        if loss_fn is None:
            return full.sum() * 0.0, one, {"filler": micro.filler, "result": full.detach()}
        if micro.filler:  # (only fillers have weight 0: the others were dropped before the schedule)
            return full.sum() * 0.0, one, {"filler": True}
        loss, metrics = loss_fn(full, micro.batch)
        return loss * micro.weight, one, {"filler": False, "result": (loss.detach(), metrics, micro.weight)}

    def offload_set(self, mode: str):
        """What ``trainer.offload_during_rollout=mode`` hands over (``tempo_mega.offload``): each
        optimizer's Adam moments and fp32 master weights (not the model's own weights, which an fp32
        optimizer steps in place); with ``all`` also the weights (the DDP parameter buffers with the
        distributed optimizer, the parameters otherwise) and the fp32 gradient buffers (dropped: every
        step zeroes them first)."""
        from tempo_mega.offload import OffloadSet, optimizer_tensors, storage_keys

        buffers = [b for d in self.ddp for b in (*d.buffers, *d.expert_parallel_buffers)]
        weights = [p for c in self.chunks for p in c.parameters()]
        weights += [b.param_data for b in buffers if b.param_data is not None]
        grads = [b.grad_data for b in buffers if b.grad_data is not None]
        inner = [o.optimizer for o in self._sub_optimizers if getattr(o, "optimizer", None) is not None]
        out = OffloadSet(keep=optimizer_tensors(inner, storage_keys(weights) | storage_keys(grads)))
        if mode == "all":
            out.keep += weights
            out.drop += grads
        return out

    # ------------------------------------------------------------------ training
    def train_step(self, batch: RolloutBatch, loss_fn: LossSpec | LossFn) -> dict[str, float]:
        """Same rule as ``TorchBackend.train_step``: epochs x mini-batches, micro-batches weighted by
        rows or tokens (``loss_fn.agg``) over the whole mini-batch (all DP ranks), clip, step.
        A collective over all ranks. A ``LossSpec`` runs through its packed kernel where ``use_kernels``."""
        loss_fn = bind_loss(loss_fn, self.use_kernels)
        o = self.optim
        for chunk in self.chunks:
            chunk.train()
        if self.moe:
            reset_step_counts(self.chunks)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + self.num_train_steps)
                stats = optimizer_passes(batch, loss_fn, epochs=o.epochs, mini_batch_size=o.mini_batch_size,
                                         max_tokens_per_micro_batch=o.max_tokens_per_micro_batch,
                                         clip_and_step=self._clip_and_step, frozen=o.lr == 0,
                                         shard=lambda mini: mini.select(self._dp_rows(mini.batch_size)),
                                         accumulate=functools.partial(self._accumulate, loss_fn))
        finally:
            self._zero_grads()
            for chunk in self.chunks:
                chunk.eval()
        self.num_train_steps += 1
        stats.totals, stats.n_micro = self._reduce_stats(dict(stats.totals), stats.n_micro)
        metrics = stats.metrics(self.role, self.optim.lr)
        if self.moe:
            c = self.chunks[0].config
            metrics.update(moe_step_metrics(self.chunks, self.role, num_layers=c.num_layers,
                                            num_experts=c.num_moe_experts, topk=c.moe_router_topk,
                                            sequence_parallel=c.sequence_parallel))
        return metrics

    def _accumulate(self, loss_fn: LossFn, micros: list[RolloutBatch], denom: int, mini: RolloutBatch,
                    totals: dict[str, float], frozen: bool) -> int:
        """Forward and backward one mini-batch's micro-batches of this rank through the schedule; the
        gradients are left reduced (finalize) for ``_clip_and_step``. Returns the micro-batches that
        counted; weighted metrics go into ``totals`` (on the last PP stage)."""
        agg = getattr(loss_fn, "agg", "seq")
        work = [_Micro(m, weight_units(m, agg) / denom) for m in micros]
        work = [m for m in work if m.weight > 0]
        if not frozen:
            self._zero_grads()
        with torch.set_grad_enabled(not frozen):
            results = self._schedule(work, mini, loss_fn=loss_fn, forward_only=frozen,
                                     temperature=self.temperature)
        for loss, metrics, w in results:
            for k, v in {**metrics, "loss": loss}.items():
                totals[k] += w * float(v)
        return len(work)

    def _zero_grads(self) -> None:
        for d in self.ddp:
            d.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _clip_and_step(self) -> float | None:
        """The gradients are reduced (finalize_model_grads ran in the schedule): norm over all model
        parallel ranks (TP duplicates and the tied output copy once), clip, step; returns the pre-clip
        norm, or None (step skipped) when it is not finite."""
        found_inf = self.optimizer.prepare_grads()
        norm = float(self.optimizer.get_grad_norm())
        ok = not found_inf and math.isfinite(norm)
        if ok:
            if self.optim.grad_clip > 0:
                for opt in self._sub_optimizers:
                    params = opt.get_parameters()
                    if params:
                        clip_grad_by_total_norm_fp32(params, self.optim.grad_clip, norm)
            ok = bool(self.optimizer.step_with_ready_grads())
        else:
            log.warning("%s: non-finite grad norm (%s), optimizer step skipped", self.role, norm)
        self._zero_grads()
        if ok:
            self.num_optimizer_steps += 1
        return norm if ok else None

    def _reduce_stats(self, totals: dict[str, float], n_micro: int) -> tuple[dict[str, float], int]:
        """Metric sums from the last PP stage to every rank, summed over DP."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return totals, n_micro
        box: list[Any] = [(totals, n_micro)]
        if self.pp_size > 1:
            dist.broadcast_object_list(box, src=self._pp_last_global_rank(),
                                       group=parallel_state.get_pipeline_model_parallel_group())
        if self.dp_size > 1:
            parts: list[Any] = [None] * self.dp_size
            dist.all_gather_object(parts, box[0], group=parallel_state.get_data_parallel_group())
        else:
            parts = [box[0]]
        summed: dict[str, float] = defaultdict(float)
        for part_totals, _ in parts:
            for k, v in part_totals.items():
                summed[k] += v
        return summed, sum(n for _, n in parts)

def _finalize_without_token_scaling(model, num_tokens=None, **kwargs) -> None:
    """megatron's finalize_model_grads, never dividing by a token count: the losses come weighted."""
    finalize_model_grads(model, None, **kwargs)
