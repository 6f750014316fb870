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
import copy
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from tempo_mega.algo.losses import LossSpec
from tempo_mega.backends.base import (
    LossFn,
    TrainBackend,
    bind_loss,
    forward_in_micro_batches,
    lr_override,
    optimizer_passes,
)
from tempo_mega.batch import RolloutBatch

log = logging.getLogger(__name__)

ROLES = ("actor", "critic")
LAYOUTS = ("padded", "packed")
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and batching of one role. ``lr == 0`` means frozen: ``train_step`` computes the loss
    (without gradients) for metrics and makes no update, e.g. the frozen-critic ablation."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max grad norm; <= 0 disables clipping (the norm is still logged)
    mini_batch_size: int = 64  # rows per optimizer step
    max_tokens_per_micro_batch: int = 16384  # real tokens per forward/backward
    epochs: int = 1  # passes over the batch per train_step

    def __post_init__(self) -> None:
        for key in ("mini_batch_size", "max_tokens_per_micro_batch", "epochs"):
            if getattr(self, key) <= 0:
                raise ValueError(f"OptimConfig.{key} must be positive, got {getattr(self, key)}")
        if self.lr < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"OptimConfig: lr, weight_decay must be >= 0 and eps > 0, got {self}")


def init_value_head(hidden_size: int, seed: int) -> dict[str, Tensor]:
    """A fresh value head's ``weight`` [1, hidden] ~ N(0, 1/(hidden + 1)) from ``seed`` and ``bias`` [1] = 0
    (float32; the RNG of the caller does not move)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, hidden_size, generator=gen) / math.sqrt(hidden_size + 1)
    return {"weight": weight, "bias": torch.zeros(1)}


class ValueHeadModel(nn.Module):
    """The critic: a decoder trunk (``Qwen3Model``) plus ``value_head = nn.Linear(hidden, 1)`` on the
    final-normed hidden states. The head is kept in float32 and runs outside autocast; it is initialized
    N(0, 1/(hidden + 1)) with bias 0 (small, not zero, so the trunk gets gradients from the first step).

    ``save_pretrained(dir)`` layout: the trunk as an HF directory (``config.json`` +
    ``model.safetensors``, names without the ``model.`` prefix, loadable by ``AutoModel``) and
    ``value_head.safetensors`` with ``weight`` [1, hidden] and ``bias`` [1].
    """

    def __init__(self, trunk: PreTrainedModel, *, seed: int = 0):
        super().__init__()
        self.model = trunk
        self.config = trunk.config
        hidden = trunk.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32, device=trunk.device)
        with torch.no_grad():
            self.value_head.load_state_dict(init_value_head(hidden, seed))

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    @contextlib.contextmanager
    def trunk_without_final_norm(self) -> Iterator[None]:
        """The trunk returns pre-norm hidden states inside this block, for the fused norm + value head.
        The norm module stays registered, so parameter names and checkpoints do not change."""
        norm = self.model.norm
        self.model.norm = nn.Identity()
        try:
            yield
        finally:
            self.model.norm = norm

    def score(self, hidden: Tensor) -> Tensor:
        """hidden [..., H] -> values [...] float32."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """input_ids [B, T] -> values [B, T] float32 (one per position)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.score(out.last_hidden_state)

    @classmethod
    def from_actor(cls, actor: PreTrainedModel, *, seed: int = 0) -> ValueHeadModel:
        """A critic whose trunk is a deep copy of the actor's (``actor.model``), with a fresh head."""
        return cls(copy.deepcopy(actor.model), seed=seed)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, dtype: torch.dtype | None = None,
                        attn_implementation: str | None = "sdpa", seed: int = 0) -> ValueHeadModel:
        """Load a ``save_pretrained`` directory. An actor (causal LM) directory also works: its trunk
        is taken and the value head is freshly initialized (said in the log)."""
        d = _existing_dir(directory)
        trunk = AutoModel.from_pretrained(d, dtype=dtype, attn_implementation=attn_implementation)
        model = cls(trunk, seed=seed)
        if (d / VALUE_HEAD_FILE).is_file():
            model.value_head.load_state_dict(load_file(d / VALUE_HEAD_FILE))
        else:
            log.info("ValueHeadModel.from_pretrained: no %s in %s, value head freshly initialized",
                     VALUE_HEAD_FILE, d)
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d)
        head = {k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()}
        save_file(head, d / VALUE_HEAD_FILE)


def _existing_dir(directory: str | Path) -> Path:
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a model directory (no config.json)")
    return d


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


def _load_causal_lm(source: str | Path | PretrainedConfig | nn.Module, dtype: torch.dtype | None,
                    attn_implementation: str | None, seed: int) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, PretrainedConfig):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(copy.deepcopy(source), dtype=dtype,
                                                    attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_pretrained(_existing_dir(source), dtype=dtype,
                                                attn_implementation=attn_implementation)


def build_actor(source: str | Path | PretrainedConfig | nn.Module, optim: OptimConfig | None = None, *,
                dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa",
                **backend_kwargs: Any) -> TorchBackend:
    """The actor backend from a local HF directory (safetensors), a config (weights initialized from
    ``seed``) or a causal-LM module. ``backend_kwargs`` go to ``TorchBackend``."""
    model = _load_causal_lm(source, dtype, attn_implementation, backend_kwargs.get("seed", 0))
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
        model = ValueHeadModel.from_actor(_load_causal_lm(source, dtype or torch.float32,
                                                          attn_implementation, seed), seed=seed)
        if dtype is not None:
            model.model.to(dtype)
    else:
        model = ValueHeadModel.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                               seed=seed)
    return TorchBackend("critic", model, optim, **backend_kwargs)
