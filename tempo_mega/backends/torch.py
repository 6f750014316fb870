"""Single-process train backend (CPU or one GPU): one ``TorchBackend`` per role, actor or critic.

Alignment (see batch.py): the log-prob of response token t and the critic value V_t are both read
from the hidden state at the position *before* that token (``P + t - 1`` in the padded layout,
``response_index - 1`` in the packed one). Only those hidden states go through the head, so the
full-vocabulary logits exist for one micro-batch's valid response tokens at a time, never for prompts.

Layouts:
- ``padded``: ``[B, P + L]`` with the 2-D attention mask and ``RolloutBatch.position_ids`` (left
  padding does not shift RoPE).
- ``packed``: all real tokens in one row ``[1, N]``, position ids restarting per sequence and an
  explicit 4-D block-diagonal causal mask (boolean for SDPA, additive float for eager attention);
  transformers passes a 4-D mask through unchanged. Flash-attention implementations get no mask:
  transformers derives the sequence boundaries from the position-id restarts.
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
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from transformers import PretrainedConfig

from tempo_mega.algo.losses import LossSpec
from tempo_mega.backends.base import (
    LossFn,
    OptimConfig,
    TrainBackend,
    bind_loss,
    forward_in_micro_batches,
    lr_override,
    optimizer_passes,
)
from tempo_mega.batch import RolloutBatch
from tempo_mega.models.critic import VALUE_HEAD_FILE, ValueHeadModel, init_value_head, load_causal_lm

log = logging.getLogger(__name__)

__all__ = ["LAYOUTS", "ROLES", "VALUE_HEAD_FILE", "OptimConfig", "TorchBackend", "ValueHeadModel",
           "build_actor", "build_critic", "init_value_head", "load_causal_lm"]

ROLES = ("actor", "critic")
LAYOUTS = ("padded", "packed")


class TorchBackend:
    """Train backend for one role on one device (satisfies ``TrainBackend``).

    ``model`` is a causal LM (``Qwen3ForCausalLM``: trunk ``.model``, head ``.lm_head``) for the actor
    and a ``ValueHeadModel`` for the critic. Parameters stay in the model's dtype; ``autocast_dtype``
    (default: bf16 on CUDA, none on CPU) sets the compute dtype. ``seed`` seeds the RNG inside each
    ``train_step`` from (seed, steps so far), so dropout, if a model has any, replays after ``load``.
    """

    def __init__(self, role: str, model: nn.Module, optim: OptimConfig | None = None, *,
                 device: str | torch.device = "cpu", temperature: float = 1.0, layout: str = "padded",
                 gradient_checkpointing: bool = False, autocast_dtype: torch.dtype | None = None,
                 seed: int = 0, use_kernels: bool = False):
        if role not in ROLES:
            raise ValueError(f"TorchBackend: role must be one of {ROLES}, got {role!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"TorchBackend: layout must be one of {LAYOUTS}, got {layout!r}")
        if temperature <= 0:
            raise ValueError(f"TorchBackend: temperature must be positive, got {temperature}")
        if role == "critic" and not isinstance(model, ValueHeadModel):
            raise ValueError(f"TorchBackend: the critic needs a ValueHeadModel, got {type(model).__name__}")
        self.role, self.layout, self.temperature, self.seed = role, layout, temperature, seed
        self.optim = optim or OptimConfig()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        impl = self.model.model.config._attn_implementation or "sdpa"
        if layout == "packed" and impl not in ("sdpa", "eager") and "flash" not in impl:
            raise ValueError(f"TorchBackend: the packed layout supports sdpa, eager and flash attention, "
                             f"not attn_implementation={impl!r}")
        if autocast_dtype is None and self.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        self.autocast_dtype = autocast_dtype
        # tempo_mega.kernels for the heads: log-probs without full-vocabulary logits (actor), the final
        # RMSNorm fused with the value projection (critic). Triton on CUDA, chunked torch elsewhere.
        self.use_kernels = use_kernels
        if gradient_checkpointing:
            trunk, kwargs = self.model.model, {"use_reentrant": False}
            if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5 name
                trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        o = self.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
        )
        self.num_train_steps = 0  # train_step calls, saved with the checkpoint

    # ------------------------------------------------------------------ forward
    def forward_logprobs(self, batch: RolloutBatch, temperature: float | None = None) -> Tensor:
        """[B, L] float32 log-probs of the response tokens under log_softmax(logits / temperature)
        (None: the temperature the backend was built with, rollout.temperature), 0 at masked positions.
        No gradient; micro-batched by ``max_tokens_per_micro_batch``."""
        if self.role != "actor":
            raise ValueError("forward_logprobs: this backend is the critic; use forward_values")
        return self._forward_no_grad(batch, temperature)

    def forward_values(self, batch: RolloutBatch) -> Tensor:
        """[B, L] float32 values V_t read before response token t (``values[:, -L-1:-1]`` over prompt +
        response), 0 at masked positions. No gradient; micro-batched."""
        if self.role != "critic":
            raise ValueError("forward_values: this backend is the actor; use forward_logprobs")
        return self._forward_no_grad(batch)

    def _forward_no_grad(self, batch: RolloutBatch, temperature: float | None = None) -> Tensor:
        self.model.eval()
        forward = self._forward if temperature is None else lambda mb: self._forward(mb, temperature)
        out = forward_in_micro_batches(batch, forward, self.optim.max_tokens_per_micro_batch)
        return out.to(batch.response_mask.device)

    def _forward(self, batch: RolloutBatch, temperature: float | None = None) -> Tensor:
        """The role's output on one micro-batch, [b, L] float32, differentiable when grad is enabled."""
        temperature = self.temperature if temperature is None else temperature
        mask = batch.response_mask.to(self.device).bool()
        targets = batch.response_ids.to(self.device)[mask]  # [N_resp]
        trunk = self.model.model
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        skip_norm = self.role == "critic" and self.use_kernels
        norm = self.model.final_norm if skip_norm else None  # taken before the trunk runs without it
        with autocast, (self.model.trunk_without_final_norm() if skip_norm else contextlib.nullcontext()):
            if self.layout == "packed":
                packed = batch.to("cpu").to_packed()
                attn = self._packed_attention_mask(packed.cu_seqlens, packed.input_ids.numel())
                hidden = trunk(input_ids=packed.input_ids[None].to(self.device),
                               position_ids=packed.position_ids[None].to(self.device),
                               attention_mask=attn).last_hidden_state[0]
                h = hidden[(packed.response_index - 1).to(self.device)]  # [N_resp, H]
            else:
                hidden = trunk(input_ids=batch.input_ids.to(self.device),
                               attention_mask=batch.attention_mask.to(self.device),
                               position_ids=batch.position_ids.to(self.device)).last_hidden_state
                p, resp_len = batch.prompt_len, batch.response_len
                h = hidden[:, p - 1 : p - 1 + resp_len][mask]  # [N_resp, H]
            if self.role == "actor" and self.use_kernels:
                from tempo_mega.kernels import fused_linear_logprob

                vals = fused_linear_logprob(h, self.model.lm_head.weight, targets, temperature=temperature)
            elif self.role == "actor":
                logits = self.model.lm_head(h).float() / temperature  # [N_resp, V]
                vals = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
            elif self.use_kernels:
                from tempo_mega.kernels import fused_value_head

                head = self.model.value_head
                vals = fused_value_head(h, norm.weight, head.weight[0], head.bias, eps=norm.variance_epsilon)
            else:
                vals = self.model.score(h)
        return torch.zeros(mask.shape, dtype=torch.float32, device=self.device).masked_scatter(mask, vals)

    def _packed_attention_mask(self, cu_seqlens: Tensor, n: int) -> Tensor | None:
        """[1, 1, N, N] block-diagonal causal mask for the packed stream (None for flash attention)."""
        impl = self.model.model.config._attn_implementation or "sdpa"
        if "flash" in impl:
            return None
        seq_id = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1), cu_seqlens.diff().long())
        idx = torch.arange(n)
        allowed = (seq_id[:, None] == seq_id[None, :]) & (idx[:, None] >= idx[None, :])
        allowed = allowed.to(self.device)[None, None]
        if impl == "sdpa":
            return allowed
        dtype = self.autocast_dtype or self.model.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # ------------------------------------------------------------------ training
    def train_step(self, batch: RolloutBatch, loss_fn: LossSpec | LossFn) -> dict[str, float]:
        """For each epoch, for each mini-batch of ``mini_batch_size`` rows (in order): accumulate the
        gradient over token-budget micro-batches, clip, AdamW step.

        Micro-batch losses are weighted so the accumulated gradient is that of the loss on the whole
        mini-batch: by rows with at least one valid token (``loss_fn.agg == "seq"``, the default: the
        losses in algo/ average over such rows) or by valid tokens (``"token"``). Micro-batches with
        weight 0 are skipped, and so are mini-batches without a valid token (no step: AdamW would
        still move the weights). A non-finite grad norm skips the step with a warning.
        Returns metrics averaged over mini-batches, namespaced ``{role}/...``. A ``LossSpec`` runs through
        its packed kernel where ``use_kernels`` is on (``bind_loss``).
        """
        loss_fn = bind_loss(loss_fn, self.use_kernels)
        o = self.optim
        devices = [self.device] if self.device.type == "cuda" else []
        self.model.train()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 1_000_003 + self.num_train_steps)
                stats = optimizer_passes(batch, loss_fn, epochs=o.epochs, mini_batch_size=o.mini_batch_size,
                                         max_tokens_per_micro_batch=o.max_tokens_per_micro_batch,
                                         forward=self._forward, clip_and_step=self._clip_and_step,
                                         frozen=o.lr == 0)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        self.num_train_steps += 1
        return stats.metrics(self.role, self.optimizer.param_groups[0]["lr"])

    def _clip_and_step(self) -> float | None:
        """Clip, step, zero grads; returns the pre-clip grad norm, or None if it was not finite."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if math.isfinite(norm):
            self.optimizer.step()
        else:
            log.warning("%s: non-finite grad norm (%s), optimizer step skipped", self.role, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else None

    # ------------------------------------------------------------------ weights and checkpoints
    def lr_override(self, lr: float) -> contextlib.AbstractContextManager[None]:
        """Train at ``lr`` inside the block (e.g. a warm start), the configured rate after."""
        return lr_override(self.optimizer.param_groups, lr)

    def reset_optimizer_state(self) -> None:
        """Forget the Adam moments (the next step starts them afresh), keep the weights."""
        self.optimizer.state.clear()

    def load_trunk_from(self, other: TrainBackend) -> None:
        """This critic's trunk := ``other``'s (the actor's, after the warm start), through the HF names
        ``other.export_weights`` streams (``model.*``); the value head is kept."""
        prefix = "model."
        trunk = {n[len(prefix):]: t for n, t in other.export_weights(device=None) if n.startswith(prefix)}
        self.model.model.load_state_dict(trunk)

    def export_weights(self, device: str | torch.device | None = "cpu") -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) pairs, detached, contiguous, on ``device`` (None: the model's), in the model dtype;
        a tensor already there is the parameter itself, not a copy. Actor: the names of
        ``Qwen3ForCausalLM.state_dict()`` without ``lm_head.weight`` when tied; critic: ``model.*`` (the
        trunk, HF causal-LM names) and ``value_head.weight`` / ``value_head.bias``."""
        tied = self.role == "actor" and bool(getattr(self.model.config, "tie_word_embeddings", False))
        for name, t in self.model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue
            yield name, t.detach().to(t.device if device is None else device).contiguous()

    def export_hf(self, directory: str | Path) -> None:
        """An HF directory (safetensors): ``AutoModelForCausalLM.from_pretrained`` for the actor,
        ``ValueHeadModel.from_pretrained`` for the critic."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)

    def offload_set(self, mode: str):
        """AdamW's moments (the parameters are the model's own); with ``all`` the weights too (the
        gradients are freed after every step: nothing to drop)."""
        from tempo_mega.offload import OffloadSet, optimizer_tensors, storage_keys

        params = list(self.model.parameters())
        out = OffloadSet(keep=optimizer_tensors([self.optimizer], storage_keys(params)))
        if mode == "all":
            out.keep += params
        return out

    def save(self, directory: str | Path) -> None:
        """``model.safetensors`` (weights), ``optimizer.pt`` (AdamW state), ``backend_state.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(d / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), d / "optimizer.pt")
        state = {"role": self.role, "num_train_steps": self.num_train_steps}
        (d / "backend_state.json").write_text(json.dumps(state, indent=1))

    def load(self, directory: str | Path) -> None:
        """Restore weights, optimizer state and step count, so training continues bit-exactly."""
        d = Path(directory)
        for name in ("model.safetensors", "optimizer.pt", "backend_state.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"TorchBackend.load: {d / name} is missing")
        state = json.loads((d / "backend_state.json").read_text())
        if state["role"] != self.role:
            raise ValueError(f"TorchBackend.load: {d} holds a {state['role']} checkpoint, this is the {self.role}")
        load_model(self.model, str(d / "model.safetensors"), strict=True, device=str(self.device))
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=self.device, weights_only=True))
        self.num_train_steps = int(state["num_train_steps"])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "num_train_steps": self.num_train_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_train_steps = int(state["num_train_steps"])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_actor(source: str | Path | PretrainedConfig | nn.Module, optim: OptimConfig | None = None, *,
                dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa",
                **backend_kwargs: Any) -> TorchBackend:
    """The actor backend from a local HF directory (safetensors), a config (weights initialized from
    ``seed``) or a causal-LM module. ``backend_kwargs`` go to ``TorchBackend``."""
    model = load_causal_lm(source, dtype, attn_implementation, backend_kwargs.get("seed", 0))
    return TorchBackend("actor", model, optim, **backend_kwargs)


def build_critic(source: str | Path | PretrainedConfig | nn.Module | TorchBackend,
                 optim: OptimConfig | None = None, *, dtype: torch.dtype | None = None,
                 attn_implementation: str | None = "sdpa", **backend_kwargs: Any) -> TorchBackend:
    """The critic backend from a ``ValueHeadModel``, an actor (module or backend: its trunk is copied),
    a directory (``ValueHeadModel.from_pretrained``: a critic or an actor directory) or a config."""
    seed = backend_kwargs.get("seed", 0)
    if isinstance(source, TorchBackend):
        source = source.model
    if isinstance(source, ValueHeadModel):
        model = source
    elif isinstance(source, (nn.Module, PretrainedConfig)):
        model = ValueHeadModel.from_actor(load_causal_lm(source, dtype or torch.float32,
                                                          attn_implementation, seed), seed=seed)
        if dtype is not None:
            model.model.to(dtype)
    else:
        model = ValueHeadModel.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                               seed=seed)
    return TorchBackend("critic", model, optim, **backend_kwargs)
