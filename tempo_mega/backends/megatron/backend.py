"""``MegatronBackend``: the TrainBackend of one role on megatron-core (TP and DP; PP not yet).

Same contract as ``TorchBackend`` (see torch.py): the log-prob of response token t and the value V_t
are read from the hidden state at position ``P + t - 1`` of the padded layout. Only those positions go
through the output layer (a pre-hook on ``output_layer`` selects them), the logits stay vocab-parallel
and the log-probs come from ``tensor_parallel.vocab_parallel_cross_entropy``: the full vocabulary is
never gathered.

Data parallel: every rank is given the whole batch; DP rank d works on its contiguous share of each
mini-batch's rows, the micro-batch weights use the global mini-batch denominator, and gradients are
summed over DP, so the update equals the single-process one. Optimizer: ``torch.optim.AdamW`` over the
local shards (TODO: megatron's DistributedOptimizer for ``megatron.use_distributed_optimizer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from torch import Tensor

from tempo_mega.backends.base import LossFn, forward_in_micro_batches, optimizer_passes
from tempo_mega.backends.megatron.config import MegatronConfig
from tempo_mega.backends.megatron.convert import hf_to_mcore_state_dict, mcore_to_hf_tensors
from tempo_mega.backends.megatron.model import build_model, init_parallel
from tempo_mega.backends.torch import OptimConfig
from tempo_mega.batch import RolloutBatch

log = logging.getLogger(__name__)

ROLES = ("actor", "critic")
STATE_FILE = "backend_state.json"


class MegatronBackend:
    """Train backend for one role (satisfies ``TrainBackend``). ``hf_config``: a Qwen3 dense config;
    ``hf_state_dict``: HF-named weights to start from (``Qwen3ForCausalLM`` names for the actor, plus
    ``value_head.*`` for the critic; without them the critic's head is freshly initialized), or None
    for megatron's random init."""

    def __init__(self, role: str, hf_config: Any, megatron_config: MegatronConfig | None = None,
                 optim: OptimConfig | None = None, *, hf_state_dict: dict[str, Tensor] | None = None,
                 temperature: float = 1.0, seed: int = 0, use_te: bool | None = None):
        if role not in ROLES:
            raise ValueError(f"MegatronBackend: role must be one of {ROLES}, got {role!r}")
        if temperature <= 0:
            raise ValueError(f"MegatronBackend: temperature must be positive, got {temperature}")
        mc = megatron_config or MegatronConfig()
        if mc.pipeline_parallel_size > 1 or mc.context_parallel_size > 1:
            raise ValueError("MegatronBackend: megatron.pipeline_parallel_size > 1 and "
                             "megatron.context_parallel_size > 1 are not supported yet (conversion is)")
        if mc.use_distributed_optimizer:
            raise ValueError("MegatronBackend: megatron.use_distributed_optimizer=True is not supported yet")
        self.role, self.hf_config, self.megatron_config = role, hf_config, mc
        self.optim, self.temperature, self.seed = optim or OptimConfig(), temperature, seed
        init_parallel(mc, seed=seed)
        self.model, self.te_layout = build_model(hf_config, mc, role=role, seed=seed, use_te=use_te)
        self.device = next(self.model.parameters()).device
        if hf_state_dict is not None:
            self.load_hf_state_dict(hf_state_dict)
        self.model.eval()
        o = self.optim
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.num_train_steps = 0
        self._positions: tuple[Tensor, Tensor] | None = None
        self.model.output_layer.register_forward_pre_hook(self._select_positions, with_kwargs=True)

    # ------------------------------------------------------------------ groups
    @property
    def tp_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def tp_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def load_hf_state_dict(self, hf_state_dict: dict[str, Tensor]) -> None:
        sd = dict(hf_state_dict)
        head_fresh = self.role == "critic" and "value_head.weight" not in sd
        if head_fresh:
            log.info("MegatronBackend: no value_head.* in the HF weights, value head freshly initialized")
            sd["value_head.weight"] = self.model.output_layer.weight.detach().cpu()
            sd["value_head.bias"] = self.model.output_layer.bias.detach().cpu()
        mc = hf_to_mcore_state_dict(sd, self.hf_config, self.tp_rank, self.tp_size, te_layout=self.te_layout)
        missing, unexpected = self.model.load_state_dict(mc, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"MegatronBackend: HF weights do not fit the model: missing {missing}, "
                             f"unexpected {unexpected}")

    # ------------------------------------------------------------------ forward
    def _select_positions(self, module, args, kwargs):
        """output_layer pre-hook: keep only the hidden states at the selected (s, b) positions."""
        if self._positions is None:
            return None
        s_idx, b_idx = self._positions
        hidden = args[0][s_idx, b_idx].unsqueeze(1)  # [N, 1, H]
        return (hidden, *args[1:]), kwargs

    @contextlib.contextmanager
    def _selecting(self, s_idx: Tensor, b_idx: Tensor) -> Iterator[None]:
        self._positions = (s_idx, b_idx)
        try:
            yield
        finally:
            self._positions = None

    def forward_logprobs(self, batch: RolloutBatch) -> Tensor:
        """[B, L] float32 log-probs of the response tokens under log_softmax(logits / temperature),
        0 at masked positions. No gradient."""
        if self.role != "actor":
            raise ValueError("forward_logprobs: this backend is the critic; use forward_values")
        return self._forward_no_grad(batch)

    def forward_values(self, batch: RolloutBatch) -> Tensor:
        """[B, L] float32 values V_t read before response token t, 0 at masked positions. No gradient."""
        if self.role != "critic":
            raise ValueError("forward_values: this backend is the actor; use forward_logprobs")
        return self._forward_no_grad(batch)

    def _forward_no_grad(self, batch: RolloutBatch) -> Tensor:
        self.model.eval()
        out = forward_in_micro_batches(batch, self._forward, self.optim.max_tokens_per_micro_batch,
                                       rows=self._dp_rows(batch.batch_size))
        if self.dp_size > 1:  # rows of the other DP ranks are zero here: a sum gathers them
            out = out.to(self.device)
            dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        return out.to(batch.response_mask.device)

    def _dp_rows(self, n: int) -> Tensor:
        return torch.tensor_split(torch.arange(n), self.dp_size)[self.dp_rank]

    def _forward(self, batch: RolloutBatch) -> Tensor:
        """[b, L] float32 output of the role on one micro-batch (differentiable when grad is on)."""
        dev = self.device
        ids = batch.input_ids.to(dev)
        keep = batch.attention_mask.to(dev).bool()
        t = ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        attention_mask = ~(causal[None, None] & keep[:, None, None, :])  # True = masked out, [b, 1, t, t]
        mask = batch.response_mask.to(dev).bool()
        b_idx, t_idx = mask.nonzero(as_tuple=True)  # row-major, like mask[mask]
        s_idx = batch.prompt_len - 1 + t_idx
        with self._selecting(s_idx, b_idx):
            out = self.model(input_ids=ids, position_ids=batch.position_ids.to(dev),
                             attention_mask=attention_mask)[0]  # [N, V/tp] or [N, 1]
        if self.role == "actor":
            logits = out.float() / self.temperature
            targets = ids[:, batch.prompt_len :][mask]
            vals = -tensor_parallel.vocab_parallel_cross_entropy(logits[:, None], targets[:, None])[:, 0]
        else:
            vals = out[:, 0].float()
        return torch.zeros(mask.shape, dtype=vals.dtype, device=dev).masked_scatter(mask, vals)

    # ------------------------------------------------------------------ training
    def train_step(self, batch: RolloutBatch, loss_fn: LossFn) -> dict[str, float]:
        """Same rule as ``TorchBackend.train_step``: epochs x mini-batches, micro-batches weighted by
        rows or tokens (``loss_fn.agg``) over the whole mini-batch (all DP ranks), clip, AdamW."""
        o = self.optim
        self.model.train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + self.num_train_steps)
                stats = optimizer_passes(batch, loss_fn, epochs=o.epochs, mini_batch_size=o.mini_batch_size,
                                         max_tokens_per_micro_batch=o.max_tokens_per_micro_batch,
                                         forward=self._forward, clip_and_step=self._clip_and_step,
                                         frozen=o.lr == 0,
                                         shard=lambda mini: mini.select(self._dp_rows(mini.batch_size)))
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        self.num_train_steps += 1
        if self.dp_size > 1:  # metric sums and micro-batch counts over all DP ranks
            keys = sorted(stats.totals)
            t = torch.tensor([stats.totals[k] for k in keys] + [float(stats.n_micro)], dtype=torch.float64)
            dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
            stats.totals = dict(zip(keys, t[:-1].tolist()))
            stats.n_micro = int(t[-1])
        return stats.metrics(self.role, self.optimizer.param_groups[0]["lr"])

    def _clip_and_step(self) -> float | None:
        """Sum grads over DP, clip by the global norm (TP shards counted once each, replicated
        parameters once), step; returns the pre-clip norm or None when it is not finite."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.tp_size > 1:
            # replicated parameters that each TP rank applies to its own heads (q/k norms) or sequence
            # shard get partial grads: sum them over TP, as megatron's finalize_model_grads does
            cfg = self.model.config
            for n, p in named:
                if ("q_layernorm" in n or "k_layernorm" in n) or (cfg.sequence_parallel and
                                                                  getattr(p, "sequence_parallel", False)):
                    dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
        if self.dp_size > 1:
            for p in params:
                dist.all_reduce(p.grad, group=parallel_state.get_data_parallel_group())
        sharded = torch.zeros((), dtype=torch.float64, device=self.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            sq = p.grad.double().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        if self.tp_size > 1:
            dist.all_reduce(sharded, group=parallel_state.get_tensor_model_parallel_group())
        norm = float((sharded + replicated).sqrt())
        if math.isfinite(norm):
            max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
            coef = max_norm / (norm + 1e-6)
            if coef < 1:
                for p in params:
                    p.grad.mul_(coef)
            self.optimizer.step()
        else:
            log.warning("%s: non-finite grad norm (%s), optimizer step skipped", self.role, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    # ------------------------------------------------------------------ weights and checkpoints
    def export_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        """HF-named (name, tensor) pairs on CPU, streamed one megatron tensor at a time, TP shards
        gathered (a collective: every TP rank must iterate). ``dtype`` None (default) keeps the model
        dtype, like ``TorchBackend.export_weights``; pass ``torch.bfloat16`` for a bf16 inference server.
        The critic's value head stays float32. Names as ``TorchBackend.export_weights``."""
        critic = self.role == "critic"
        for name, t in self.model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            t = t.detach()
            param_like = dict(self.model.named_parameters()).get(name)
            if self.tp_size > 1 and param_like is not None and getattr(param_like, "tensor_model_parallel", False):
                shards = [torch.empty_like(t) for _ in range(self.tp_size)]
                dist.all_gather(shards, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            else:
                shards = [t]
            for hf_name, hf_t in mcore_to_hf_tensors(name, shards, self.hf_config, critic=critic):
                keep = dtype is None or hf_name.startswith("value_head.")
                # a copy, never a view of a live parameter: a later optimizer step must not change it
                yield hf_name, hf_t.to(device="cpu", dtype=hf_t.dtype if keep else dtype, copy=True).contiguous()

    def hf_module(self) -> torch.nn.Module:
        """This role as a transformers module on CPU, from ``export_weights`` (a collective): a
        ``Qwen3ForCausalLM`` for the actor, a ``ValueHeadModel`` (torch backend's critic) for the critic.
        Built under a forked RNG, so the caller's random stream does not move."""
        from transformers import AutoModel, AutoModelForCausalLM

        from tempo_mega.backends.torch import ValueHeadModel

        weights = dict(self.export_weights(dtype=None))
        dtype = next(t.dtype for n, t in weights.items() if not n.startswith("value_head."))
        with torch.random.fork_rng(devices=[]):
            if self.role == "actor":
                module = AutoModelForCausalLM.from_config(self.hf_config, dtype=dtype)
            else:
                module = ValueHeadModel(AutoModel.from_config(self.hf_config, dtype=dtype), seed=self.seed)
        missing, unexpected = module.load_state_dict(weights, strict=False)
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"MegatronBackend.hf_module: exported weights do not fit the HF model: "
                               f"missing {missing}, unexpected {unexpected}")
        if tied and self.role == "actor":
            module.tie_weights()
        return module.eval()

    def export_hf(self, directory: str | Path) -> None:
        """An HF directory (safetensors), as ``TorchBackend.export_hf`` writes it:
        ``AutoModelForCausalLM.from_pretrained`` for the actor, ``ValueHeadModel.from_pretrained`` for the
        critic. A collective (TP shards are gathered); rank 0 writes."""
        module = self.hf_module()
        if not dist.is_initialized() or dist.get_rank() == 0:
            Path(directory).mkdir(parents=True, exist_ok=True)
            module.save_pretrained(directory)
        if dist.is_initialized():
            dist.barrier()

    def _sharded_state_dict(self) -> dict[str, Any]:
        model_sd = self.model.sharded_state_dict(prefix="model.")
        sd: dict[str, Any] = {"model": model_sd}
        # sharded keys of stacked layers are shared (the layer is an offset), the dict keys are not
        by_param = {id(sh.data): (name, sh) for name, sh in model_sd.items() if hasattr(sh, "data")
                    and isinstance(sh.data, torch.Tensor)}
        optim_sd: dict[str, Any] = {}
        for p, st in self.optimizer.state.items():
            if id(p) not in by_param:
                raise RuntimeError("MegatronBackend: a parameter has optimizer state but no sharded tensor")
            name, sh = by_param[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                optim_sd[f"{key}.{name}"] = make_sharded_optimizer_tensor(sh, st[key], f"optimizer.{key}")
        sd["optimizer"] = optim_sd
        return sd

    def save(self, directory: str | Path) -> None:
        """A megatron dist-checkpoint (weights and AdamW moments, loadable at any TP layout) plus
        ``backend_state.json``. A collective: every rank calls it with the same directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(), str(d))
        if dist.get_rank() == 0:
            steps = [int(st["step"]) for st in self.optimizer.state.values()]
            state = {"role": self.role, "num_train_steps": self.num_train_steps,
                     "optimizer_step": steps[0] if steps else 0}
            (d / STATE_FILE).write_text(json.dumps(state, indent=1))
        dist.barrier()

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        if not (d / STATE_FILE).is_file():
            raise FileNotFoundError(f"MegatronBackend.load: {d / STATE_FILE} is missing")
        state = json.loads((d / STATE_FILE).read_text())
        if state["role"] != self.role:
            raise ValueError(f"MegatronBackend.load: {d} holds a {state['role']} checkpoint, this is the {self.role}")
        if state["optimizer_step"]:  # create the AdamW state so that there is a place to load it into
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self.optimizer.state[p] = {"step": torch.tensor(float(state["optimizer_step"])),
                                               "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        sharded = self._sharded_state_dict()
        # load() swaps the tensors inside ``sharded``: take the parameter -> key map before
        keys = {id(sh.data): name for name, sh in sharded["model"].items() if hasattr(sh, "data")}
        if not state["optimizer_step"]:
            sharded.pop("optimizer")
        loaded = dist_checkpointing.load(sharded, str(d))
        model_sd = {k[len("model."):]: v for k, v in loaded["model"].items()}
        self.model.load_state_dict(model_sd, strict=False)
        if state["optimizer_step"]:
            with torch.no_grad():
                for p, st in self.optimizer.state.items():
                    for key in ("exp_avg", "exp_avg_sq"):
                        st[key].copy_(loaded["optimizer"][f"{key}.{keys[id(p)]}"])
        self.num_train_steps = int(state["num_train_steps"])
