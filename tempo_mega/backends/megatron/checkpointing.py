"""Weights out of and into ``MegatronBackend`` and its checkpoints (``_WeightsAndCheckpoints``, a mixin: the
state is the backend's): HF-named tensors streamed from the local shards (``export_weights``, gathered over
TP and PP), an HF module or directory on one rank, the distributed checkpoint of model and optimizer
(``save`` / ``load``, atomic), the optimizer's learning-rate override and reset, and the critic trunk copied
from the actor."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch import Tensor

from tempo_mega.backends.base import (
    lr_override,
)
from tempo_mega.backends.megatron.convert import layer_offset, mcore_to_hf_tensors
from tempo_mega.backends.megatron.dist_ckpt import save_sharded

log = logging.getLogger(__name__)

STATE_FILE = "backend_state.json"


def _no_init_weights():
    """transformers' context that allocates a model without its random init (it moved in 5.x)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class _WeightsAndCheckpoints:
    """Export, checkpoint and optimizer state of ``MegatronBackend``."""

    def _local_hf_tensors(self, dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
        """This PP stage's HF-named tensors, TP shards gathered (a collective over the TP group)."""
        critic = self.role == "critic"
        vpp = self.megatron_config.vpp
        for v, chunk in enumerate(self.chunks):
            offset = layer_offset(self.hf_config, self.pp_rank, self.pp_size, v if vpp else 0, vpp or 1)
            params = dict(chunk.named_parameters())
            for name, t in chunk.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                if name == "output_layer.weight" and not critic and not chunk.pre_process and \
                        chunk.share_embeddings_and_output_weights:
                    continue  # the last stage's copy of the tied embedding
                t = t.detach()
                param = params.get(name)
                if self.tp_size > 1 and param is not None and getattr(param, "tensor_model_parallel", False):
                    shards = [torch.empty_like(t) for _ in range(self.tp_size)]
                    dist.all_gather(shards, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                else:
                    shards = [t]
                for hf_name, hf_t in mcore_to_hf_tensors(name, shards, self.hf_config, critic=critic,
                                                         layer_offset=offset):
                    keep = dtype is None or hf_name.startswith("value_head.")
                    yield hf_name, hf_t.to(dtype=hf_t.dtype if keep else dtype).contiguous()

    def lr_override(self, lr: float) -> contextlib.AbstractContextManager[None]:
        """Train at ``lr`` inside the block (e.g. a warm start), the configured rate after."""
        return lr_override(self.optimizer.param_groups, lr)

    def reset_optimizer_state(self) -> None:
        """Forget the Adam moments (the next step starts them afresh, from zero moments and step 0, which
        stay allocated), keep the weights."""
        for opt in self._sub_optimizers:
            inner = getattr(opt, "optimizer", None)
            if inner is not None:
                inner.state.clear()
        self._init_optimizer_state()
        self.num_optimizer_steps = 0

    def load_trunk_from(self, other) -> None:
        """This critic's trunk := ``other``'s (the actor's, after the warm start), through HF names (a
        collective: ``other.export_weights`` gathers over TP and PP); the value head is kept."""
        self.load_hf_state_dict({n: t for n, t in other.export_weights(dtype=None) if n.startswith("model.")})

    def export_weights(self, dtype: torch.dtype | None = None,
                       device: str | torch.device | None = "cpu") -> Iterator[tuple[str, Tensor]]:
        """HF-named (name, tensor) pairs on ``device`` (None: the model's, e.g. for SGLang's CUDA-IPC sync,
        which would otherwise take every tensor through host memory and back), streamed one tensor at a
        time: TP shards gathered, PP stages broadcast to the whole pipeline (a collective: every rank must
        iterate to the end). ``dtype`` None (default) keeps the model dtype, like
        ``TorchBackend.export_weights``; pass ``torch.bfloat16`` for a bf16 inference server. The critic's
        value head stays float32. Every tensor is a copy, never a view of a live parameter."""
        device = self.device if device is None else device
        if self.pp_size == 1:
            for name, t in self._local_hf_tensors(dtype):
                yield name, t.to(device, copy=True)
            return
        group = parallel_state.get_pipeline_model_parallel_group()
        for src in range(self.pp_size):
            src_global = dist.get_global_rank(group, src)
            local = self._local_hf_tensors(dtype) if src == self.pp_rank else None
            while True:
                item = next(local, None) if local is not None else None
                meta: list[Any] = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
                dist.broadcast_object_list(meta, src=src_global, group=group)
                if meta[0] is None:
                    break
                name, shape, dt = meta[0]
                t = item[1].to(self.device) if item is not None else torch.empty(shape, dtype=dt, device=self.device)
                dist.broadcast(t, src=src_global, group=group)
                yield name, t.to(device, copy=True)

    def hf_module(self, *, rank0_only: bool = False) -> torch.nn.Module | None:
        """This role as a transformers module on CPU, from ``export_weights`` (a collective): a
        ``Qwen3ForCausalLM`` for the actor, a ``ValueHeadModel`` (torch backend's critic) for the critic.

        The module is allocated without its random init and filled one exported tensor at a time, so a
        rank holds the model once (not the model plus a dict of its weights). ``rank0_only``: the other
        ranks take part in the export and return None, so that a node of 8 ranks does not hold 8 copies.
        Built under a forked RNG, so the caller's random stream does not move."""
        from transformers import AutoModel, AutoModelForCausalLM

        from tempo_mega.models.critic import ValueHeadModel

        stream = self.export_weights(dtype=None)
        if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
            for _ in stream:  # the export is a collective
                pass
            return None
        ahead: list[tuple[str, Tensor]] = []  # the model dtype is the first non-value-head tensor's
        for name, t in stream:
            ahead.append((name, t))
            if not name.startswith("value_head."):
                break
        dtype = ahead[-1][1].dtype
        with torch.random.fork_rng(devices=[]), _no_init_weights():
            if self.role == "actor":
                module = AutoModelForCausalLM.from_config(self.hf_config, dtype=dtype)
            else:
                module = ValueHeadModel(AutoModel.from_config(self.hf_config, dtype=dtype), seed=self.seed)
        targets = module.state_dict(keep_vars=True)
        loaded, unexpected = set(), []
        with torch.no_grad():
            for name, t in itertools.chain(ahead, stream):
                if name not in targets or targets[name].shape != t.shape:
                    unexpected.append(name if name not in targets else f"{name} {tuple(t.shape)}")
                    continue
                targets[name].copy_(t)
                loaded.add(name)
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        missing = [k for k in targets if k not in loaded and not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"MegatronBackend.hf_module: exported weights do not fit the HF model: "
                               f"missing {missing}, unexpected {unexpected}")
        if tied and self.role == "actor":
            module.tie_weights()
        return module.eval()

    def export_hf(self, directory: str | Path) -> None:
        """An HF directory (safetensors), as ``TorchBackend.export_hf`` writes it:
        ``AutoModelForCausalLM.from_pretrained`` for the actor, ``ValueHeadModel.from_pretrained`` for the
        critic. A collective (shards and stages are gathered); rank 0 alone builds the module and writes."""
        module = self.hf_module(rank0_only=True)
        if module is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            module.save_pretrained(directory)
        if dist.is_initialized():
            dist.barrier()

    def _init_optimizer_state(self) -> None:
        """Zero moments (and step 0) where the optimizer has no state yet, so that a checkpoint's state
        has tensors to load into (megatron's distributed optimizer over torch's Adam reads the step
        before it would create them)."""
        for opt in self._sub_optimizers:
            inner = getattr(opt, "optimizer", None)
            if inner is None or getattr(opt, "init_state_fn", None) is None:
                continue
            opt.init_state_fn(inner, opt.config)
            if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                for group in inner.param_groups:
                    for p in group["params"]:
                        inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))

    def _load_optimizer_state(self, state_dict: dict[str, Any]) -> None:
        """``optimizer.load_state_dict``, except for megatron's distributed optimizer over torch's Adam
        (no Apex / TE): there torch keeps a per-parameter ``step`` that megatron's checkpoint does not
        hold, and its loader would look for it; the moments and master weights are loaded with the steps
        set aside (they come from the param groups)."""
        subs = self._sub_optimizers
        inner = getattr(subs[0], "optimizer", None) if len(subs) == 1 else None
        per_param_step = inner is not None and any("step" in st for st in inner.state.values())
        if "param_state" not in state_dict or not per_param_step:
            self.optimizer.load_state_dict(state_dict)
            return
        param_state, kind = state_dict.pop("param_state"), state_dict.pop("param_state_sharding_type")
        self.optimizer.load_state_dict(state_dict)  # param groups and step
        steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
        try:
            with torch.no_grad():
                getattr(subs[0], f"load_parameter_state_from_{kind}")(param_state)
        finally:
            for p, step in steps.items():
                # one tensor per parameter: megatron hands every parameter the same step tensor, which
                # torch's Adam would then advance once per parameter and step
                inner.state[p]["step"] = step.detach().clone()

    @staticmethod
    def _optim_ckpt_metadata() -> dict[str, Any]:
        # the distributed optimizer's state in the per-parameter layout of a plain optimizer, so that
        # a checkpoint loads at any TP / PP / DP layout (gathered per model-parallel rank on DP rank 0)
        return {"distrib_optim_sharding_type": "fully_reshardable"}

    def _model_sharded_state_dict(self) -> dict[str, Any]:
        # sharded keys carry global layer numbers, so any TP/PP/VPP layout can load them
        return {f"model{i}": c.sharded_state_dict(prefix="model.") for i, c in enumerate(self.chunks)}

    def save(self, directory: str | Path) -> None:
        """A megatron dist-checkpoint (weights and optimizer state, loadable at any TP/PP layout) plus
        ``backend_state.json``. A collective: every rank calls it with the same directory. A write that
        fails on any rank raises ``DistCheckpointWriteError`` naming the directory on every rank."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        sd: dict[str, Any] = {"model": self._model_sharded_state_dict()}
        if self.num_optimizer_steps:
            sd["optimizer"] = self.optimizer.sharded_state_dict(sd["model"], metadata=self._optim_ckpt_metadata())
        save_sharded(sd, d)  # a failed write raises on every rank (dist_ckpt.py), never waits forever
        if dist.get_rank() == 0:
            state = {"role": self.role, "num_train_steps": self.num_train_steps,
                     "num_optimizer_steps": self.num_optimizer_steps,
                     "use_distributed_optimizer": self.megatron_config.use_distributed_optimizer}
            (d / STATE_FILE).write_text(json.dumps(state, indent=1))
        dist.barrier()

    def load(self, directory: str | Path) -> None:
        d = Path(directory)
        if not (d / STATE_FILE).is_file():
            raise FileNotFoundError(f"MegatronBackend.load: {d / STATE_FILE} is missing")
        state = json.loads((d / STATE_FILE).read_text())
        if state["role"] != self.role:
            raise ValueError(f"MegatronBackend.load: {d} holds a {state['role']} checkpoint, this is the {self.role}")
        dist_opt = self.megatron_config.use_distributed_optimizer
        if state["num_optimizer_steps"] and state.get("use_distributed_optimizer", False) != dist_opt:
            raise ValueError(f"MegatronBackend.load: {d} holds the state of a "
                             f"{'distributed' if not dist_opt else 'non-distributed'} optimizer; load it with "
                             f"megatron.use_distributed_optimizer={not dist_opt} (the two formats differ)")
        model_sd = self._model_sharded_state_dict()
        sd: dict[str, Any] = {"model": model_sd}
        if state["num_optimizer_steps"]:
            self._init_optimizer_state()
            sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                metadata=self._optim_ckpt_metadata())
        loaded = dist_checkpointing.load(sd, str(d))
        for i, chunk in enumerate(self.chunks):
            part = {k[len("model."):]: v for k, v in loaded["model"][f"model{i}"].items()}
            chunk.load_state_dict(part, strict=False)
        self.optimizer.reload_model_params()
        if state["num_optimizer_steps"]:
            self._load_optimizer_state(loaded["optimizer"])
        self.num_train_steps = int(state["num_train_steps"])
        self.num_optimizer_steps = int(state["num_optimizer_steps"])

