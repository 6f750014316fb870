"""Checkpoints of ``MegatronBackend`` (``_Checkpoints``, a mixin: the state is the backend's): the
distributed checkpoint of model and optimizer (``save`` / ``load``, atomic, resharded across layouts), the
optimizer state made at start, the learning-rate override and the reset of the moments. The weights
themselves go in and out through ``weights.py``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from tempo_mega.backends.base import lr_override
from tempo_mega.backends.megatron.dist_ckpt import save_sharded

STATE_FILE = "backend_state.json"


class _Checkpoints:
    """Checkpoint and optimizer state of ``MegatronBackend``."""

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
        """``optimizer.load_state_dict``, per sub-optimizer (a mixture of experts has a dense and an
        expert one, whose states megatron keeps under keys 0 and 1), except for megatron's distributed
        optimizer over torch's Adam (no Apex / TE): there torch keeps a per-parameter ``step`` that
        megatron's checkpoint does not hold, and its loader would look for it; the moments and master
        weights are loaded with the steps set aside (they come from the param groups)."""
        subs = self._sub_optimizers
        parts = [state_dict] if len(subs) == 1 else [state_dict[i] for i in range(len(subs))]
        for opt, part in zip(subs, parts):
            _load_one_optimizer_state(opt, part)

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
        if state["num_optimizer_steps"]:
            # the float32 master weights come with the optimizer state; copying the 16-bit model weights
            # into them first would round them (and the loaded state may share their storage)
            self._load_optimizer_state(loaded["optimizer"])
        else:
            self.optimizer.reload_model_params()
        self.num_train_steps = int(state["num_train_steps"])
        self.num_optimizer_steps = int(state["num_optimizer_steps"])


def _load_one_optimizer_state(opt: Any, state_dict: dict[str, Any]) -> None:
    """One (not chained) megatron optimizer's state (``_Checkpoints._load_optimizer_state``)."""
    inner = getattr(opt, "optimizer", None)
    per_param_step = inner is not None and any("step" in st for st in inner.state.values())
    if "param_state" not in state_dict or not per_param_step:
        opt.load_state_dict(state_dict)
        return
    param_state, kind = state_dict.pop("param_state"), state_dict.pop("param_state_sharding_type")
    opt.load_state_dict(state_dict)  # param groups and step
    steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
    try:
        with torch.no_grad():
            getattr(opt, f"load_parameter_state_from_{kind}")(param_state)
    finally:
        for p, step in steps.items():
            # one tensor per parameter: megatron hands every parameter the same step tensor, which
            # torch's Adam would then advance once per parameter and step
            inner.state[p]["step"] = step.detach().clone()
