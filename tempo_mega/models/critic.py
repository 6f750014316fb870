"""The critic model: a decoder trunk plus a float32 value head, in HF layout (``ValueHeadModel``), the
head's initialization (``init_value_head``, shared with the Megatron critic) and its file
(``VALUE_HEAD_FILE``); ``load_causal_lm`` loads or builds an actor."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


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


def load_causal_lm(source: str | Path | PretrainedConfig | nn.Module, dtype: torch.dtype | None,
                    attn_implementation: str | None, seed: int) -> nn.Module:
    """A causal LM: ``source`` itself if a module, built from a config with weights from ``seed``, or
    loaded from a local HF directory."""
    if isinstance(source, nn.Module):
        return source
    if isinstance(source, PretrainedConfig):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(copy.deepcopy(source), dtype=dtype,
                                                    attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_pretrained(_existing_dir(source), dtype=dtype,
                                                attn_implementation=attn_implementation)
