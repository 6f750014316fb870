"""Mixture-of-experts training on megatron-core: the router the MoE layers are built with, how its
losses are weighted, what it reports, and the checks megatron's MoE options need at build time.

``MoERouter`` is megatron's ``TopKRouter`` (same routing, same weights, same checkpoint names) with two
changes, both made through megatron's own spec (``MoESubmodules.router``), no hook:

- **Loss weighting.** megatron attaches the router's load-balancing and z losses to the activations
  (``MoEAuxLossAutoScaler``) scaled for its own per-token normalisation, which the backend does not use
  (it weights each micro-batch's loss by its share of the mini-batch, ``backend.py``). Here each
  micro-batch's router losses are scaled by that same share (``RouterInputs.weight``, set for the
  micro-batch in flight), fixed in the autograd graph at forward time, so pipelining cannot mix the
  weights of two micro-batches up: the role trains ``sum_m w_m (loss_m + aux_coeff aux_m + z_coeff z_m)``.
- **Routing replay.** Given the sampler's experts for the micro-batch's tokens (``RouterInputs.replay``,
  per layer), megatron's top-k hook (``router_replay``) routes to them instead of its own top k; the gate
  weights stay the trainer's (so the router still gets a gradient), and how often its own top k was the
  sampler's is counted (``moe_routing_agreement``).
- **Recompute.** Under full activation recompute a layer runs again in the backward, while another
  micro-batch is in flight (1F1B): each router keeps what its first, gradient-free pass saw (weight,
  tokens, replayed experts) for its recompute, in order.
- **Metrics.** In training forwards it counts, per expert, the tokens routed there, the router's
  probability mass and the z statistic; ``moe_step_metrics`` turns one train step's counts, summed over
  every rank that held distinct tokens, into ``moe_load_imbalance`` (max / mean tokens per expert,
  mean over layers), ``moe_load_imbalance_max`` (the worst layer), ``moe_aux_loss`` (the switch
  load-balancing loss E/k sum_e f_e P_e of the step's routing, mean over layers: 1 when perfectly
  balanced; coefficient excluded, computed whether or not it is trained) and ``moe_z_loss``
  (mean logsumexp^2 of the router logits).

The backend marks the positions of a packed stream that hold no token of a row (``padding_mask``):
they are routed (their outputs are never read) but enter neither the router losses nor the metrics.
With expert parallelism every rank of an EP group must run the same micro-batches, of the same
lengths for the allgather dispatcher: the backend pads the schedules of the DP ranks to one count and
one length per micro-batch (``backend._schedule``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler, TopKRouter
from torch import Tensor, nn


class _Micro(NamedTuple):
    """What one router call knows of its micro-batch (``RouterInputs``), kept for its recompute."""

    weight: float
    tokens: int
    count: bool
    replay: tuple[Tensor, Tensor] | None  # this layer's (target [n, k] long, valid [n] bool)


class RouterInputs:
    """What the backend tells the routers of one model about the micro-batch in flight (``weighting``):
    its loss weight, its number of real tokens (over all sequence- and context-parallel ranks), whether
    its routing counts in the step's metrics (not for the filler micro-batches a schedule is padded
    with), and for routing replay the experts to route this rank's tokens to, per layer number:
    (target [tokens, k], valid [tokens]); where ``valid`` is False (padding, a row's last token, which the
    sampler never routed) the router routes as it would."""

    def __init__(self) -> None:
        self.weight, self.tokens, self.count = 1.0, 1, True
        self.replay: Mapping[int, tuple[Tensor, Tensor]] | None = None

    @contextlib.contextmanager
    def weighting(self, weight: float, *, tokens: int, count: bool = True,
                  replay: Mapping[int, tuple[Tensor, Tensor]] | None = None) -> Iterator[None]:
        self.weight, self.tokens, self.count, self.replay = weight, tokens, count, replay
        try:
            yield
        finally:
            self.weight, self.tokens, self.count, self.replay = 1.0, 1, True, None

    def micro(self, layer_number: int) -> _Micro:
        return _Micro(self.weight, self.tokens, self.count, self.replay.get(layer_number) if self.replay else None)


class _Replay:
    """What megatron's top-k routing asks for the top k (``topk_routing_with_score_function``'s
    ``router_replay``): the router's own top k, replaced where the micro-batch names the sampler's
    experts. The gate weights stay the trainer's: its scores gathered at the replayed experts (softmax
    over their logits, or their pre-softmax probabilities), so the router still gets a gradient."""

    def __init__(self, router: MoERouter):
        self._router = [router]  # a list: not a submodule

    def get_replay_topk(self, scores: Tensor, topk: int, num_groups: int | None = None,
                        group_topk: int | None = None, default_compute_topk: Any = None) -> tuple[Tensor, Tensor]:
        probs, idx = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        router = self._router[0]
        micro = router._micro
        if micro is None or micro.replay is None:
            return probs, idx
        target, valid = micro.replay
        if target.shape != idx.shape:
            raise RuntimeError(f"routing replay: layer {router.layer_number} routes {tuple(idx.shape)} (tokens, k) "
                               f"here, the recorded routing has {tuple(target.shape)}")
        router._observe_agreement(idx, target, valid)
        idx = torch.where(valid[:, None], target, idx)
        return scores.gather(1, idx), idx


class MoERouter(TopKRouter):
    """megatron's top-k router, its losses weighted by ``inputs.weight`` and its routing counted for the
    step's metrics (module docstring)."""

    def __init__(self, config: Any, pg_collection: Any = None, *, inputs: RouterInputs):
        super().__init__(config=config, pg_collection=pg_collection)
        self.inputs = inputs
        self.router_replay = _Replay(self)  # megatron asks it for the top k; replays what inputs names
        e = config.num_moe_experts
        # [tokens per expert (E), probability mass per expert (E), sum of logsumexp^2, tokens, replayed tokens
        # whose own top k is the sampler's, replayed tokens]
        self.register_buffer("step_counts", torch.zeros(2 * e + 4, dtype=torch.float64), persistent=False)
        self._micro: _Micro | None = None  # the micro-batch of the call in progress
        self._recompute: collections.deque[_Micro] = collections.deque()

    def _micro_of_call(self) -> _Micro:
        """The micro-batch this call computes: the one in flight, except in the recompute of a fully
        recomputed layer, which runs in the backward (another micro-batch in flight by then under 1F1B):
        its first, gradient-free pass keeps what it saw for it (the backward recomputes in order)."""
        now = self.inputs.micro(self.layer_number)
        if not self.training or self.config.recompute_granularity != "full":
            return now
        if not torch.is_grad_enabled():
            self._recompute.append(now)
            return now
        return self._recompute.popleft() if self._recompute else now

    def forget_recompute(self) -> None:
        """Drop what gradient-free training passes kept (a frozen role's step has no backward)."""
        self._recompute.clear()

    def routing(self, logits: Tensor, padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._micro = self._micro_of_call()
        try:
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        finally:
            micro, self._micro = self._micro, None
        # a training forward (or its recompute, not both: the first pass of a recomputed layer has no grad)
        if self.training and torch.is_grad_enabled() and micro.count:
            with torch.no_grad():
                e = self.config.num_moe_experts
                flat = logits.detach().reshape(-1, e).float()
                real = routing_map
                if padding_mask is not None:  # True = padding (megatron's convention in the router)
                    keep = ~padding_mask.reshape(-1)
                    flat, real = flat[keep], routing_map[keep]
                c = self.step_counts
                c[:e] += real.sum(dim=0).to(c.dtype)
                c[e : 2 * e] += torch.softmax(flat, dim=-1).sum(dim=0).to(c.dtype)
                c[2 * e] += torch.logsumexp(flat, dim=-1).square().sum().to(c.dtype)
                c[2 * e + 1] += flat.shape[0]
        return probs, routing_map

    def _observe_agreement(self, own: Tensor, target: Tensor, valid: Tensor) -> None:
        """Count the replayed tokens whose own top k (as a set) is the sampler's, in training forwards."""
        if self.training and torch.is_grad_enabled() and self._micro is not None and self._micro.count:
            with torch.no_grad():
                same = (own.sort(dim=-1).values == target.sort(dim=-1).values).all(dim=-1) & valid
                e = self.config.num_moe_experts
                self.step_counts[2 * e + 2] += same.sum().to(self.step_counts.dtype)
                self.step_counts[2 * e + 3] += valid.sum().to(self.step_counts.dtype)

    def attach_and_log_load_balancing_loss(self, activation: Tensor, aux_loss_coeff: float, aux_loss: Tensor,
                                           aux_loss_name: str, reduce_group: Any, reduce_group_has_dp: bool = False,
                                           valid_token_count: Any = None) -> Tensor:
        return MoEAuxLossAutoScaler.apply(activation, aux_loss * self._micro.weight)

    def apply_z_loss(self, logits: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """The ST-MoE z-loss, coeff x mean over the micro-batch's real tokens of logsumexp(logits)^2. Each
        rank adds its tokens' part over the micro-batch's whole token count, so the parts of sequence-
        and context-parallel ranks sum to the exact mean (megatron-core takes the mean of each rank's
        own mean, which differs when padding splits unevenly)."""
        coeff = self.config.moe_z_loss_coeff
        if coeff is not None and self.training and torch.is_grad_enabled():
            lse2 = torch.logsumexp(logits.float(), dim=-1).square()
            if padding_mask is not None:  # True = padding
                lse2 = lse2.masked_fill(padding_mask.reshape(-1), 0.0)
            z = lse2.sum() * (coeff / max(self._micro.tokens, 1))
            logits = MoEAuxLossAutoScaler.apply(logits, z * self._micro.weight)
        return logits


def router_builder(inputs: RouterInputs):
    """What a MoE layer spec's ``router`` entry takes: builds a ``MoERouter`` reading ``inputs``."""
    return functools.partial(MoERouter, inputs=inputs)


def routers(chunks: list[nn.Module]) -> list[MoERouter]:
    return [m for c in chunks for m in c.modules() if isinstance(m, MoERouter)]


def reset_step_counts(chunks: list[nn.Module]) -> None:
    for r in routers(chunks):
        r.step_counts.zero_()
        r.forget_recompute()


def moe_step_metrics(chunks: list[nn.Module], role: str, *, num_layers: int, num_experts: int, topk: int,
                     sequence_parallel: bool) -> dict[str, float]:
    """The MoE metrics of the train step whose counts the routers of ``chunks`` hold (module
    docstring). A collective over all ranks: every rank adds its layers' counts, weighted so that a
    token counts once (TP ranks without sequence parallel hold the same tokens; DP and CP ranks, and TP
    ranks with it, hold distinct ones; PP stages hold distinct layers)."""
    e = num_experts
    table = torch.zeros(num_layers, 2 * e + 4, dtype=torch.float64)
    for r in routers(chunks):
        table[r.layer_number - 1] += r.step_counts.cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if not sequence_parallel:
            table /= tp
        dev = next(p for c in chunks for p in c.parameters()).device
        box = table.to(dev)
        dist.all_reduce(box)
        table = box.cpu()
    tokens, mass, lse2, n = table[:, :e], table[:, e : 2 * e], table[:, 2 * e], table[:, 2 * e + 1]
    agree, replayed = float(table[:, 2 * e + 2].sum()), float(table[:, 2 * e + 3].sum())
    seen = n > 0
    if not bool(seen.any()):
        return {}
    extra = {f"{role}/moe_routing_agreement": agree / replayed} if replayed > 0 else {}
    tokens, mass, lse2, n = tokens[seen], mass[seen], lse2[seen], n[seen]
    imbalance = tokens.max(dim=1).values / tokens.mean(dim=1).clamp_min(1e-12)
    f = tokens / (n[:, None] * topk)  # fraction of the routed slots per expert
    p = mass / n[:, None]  # mean router probability per expert
    aux = e * (f * p).sum(dim=1)
    return {f"{role}/moe_load_imbalance": float(imbalance.mean()),
            f"{role}/moe_load_imbalance_max": float(imbalance.max()),
            f"{role}/moe_aux_loss": float(aux.mean()),
            f"{role}/moe_z_loss": float((lse2 / n).mean()), **extra}


def check_moe_runtime(config: Any, *, te_layout: bool) -> None:
    """Raise ``ValueError`` naming the ``megatron.moe_*`` key whose value (in the ``TransformerConfig``
    ``config`` built from it) this machine cannot run."""
    cuda = torch.cuda.is_available()
    dispatcher = config.moe_token_dispatcher_type
    if dispatcher == "alltoall" and not cuda:
        raise ValueError("megatron.moe_token_dispatcher=alltoall needs a GPU (megatron-core's all-to-all "
                         "dispatcher copies through a CUDA stream); use allgather on CPU")
    if dispatcher == "flex":
        try:
            import deep_ep  # noqa: F401
        except Exception:
            raise ValueError("megatron.moe_token_dispatcher=flex needs DeepEP (deep_ep does not import here); "
                             "use alltoall") from None
    if config.moe_grouped_gemm and not (te_layout and cuda):
        raise ValueError("megatron.moe_grouped_gemm=true needs a GPU and Transformer Engine (its grouped "
                         "GEMM); set it false here")
