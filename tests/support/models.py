"""The tiny Qwen3 of the suite: ``configs/model/tiny.yaml``'s shape (what ``experiment=debug_cpu``
trains), with per-test overrides where a test needs another (a smaller vocabulary, one layer, untied
embeddings, a peakier init)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

TINY_YAML = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


@cache
def tiny_shape() -> dict:
    """The Qwen3 shape keys of configs/model/tiny.yaml."""
    from omegaconf import OmegaConf

    from tempo_mega.models import QWEN3_SHAPE_KEYS

    raw = OmegaConf.to_container(OmegaConf.load(TINY_YAML))
    return {k: raw[k] for k in QWEN3_SHAPE_KEYS}


def tiny_qwen3_config(vocab_size: int = 128, **overrides):
    """A ``Qwen3Config`` of the tiny shape, ``overrides`` (any Qwen3Config key) applied last."""
    from transformers import Qwen3Config

    base = dict(tiny_shape())
    if "rope_parameters" in overrides:  # transformers' newer spelling of rope_theta (and its scaling)
        base.pop("rope_theta")
    return Qwen3Config(**{**base, "vocab_size": vocab_size, **overrides})


def tiny_qwen3(seed: int = 0, **overrides):
    """A freshly initialized tiny ``Qwen3ForCausalLM`` in eval mode, its weights drawn from ``seed``."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_qwen3_config(**overrides)).eval()


def megatron_tiny_config(tied: bool, layers: int = 2):
    """The shape of the Megatron conversion and parallel tests: the tiny one with a narrower MLP, a short
    context, ``layers`` layers (4: room for PP x virtual stages) and tied or untied embeddings."""
    return tiny_qwen3_config(num_hidden_layers=layers, intermediate_size=96, max_position_embeddings=64,
                             tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e4})


def hf_model(cfg, seed: int = 0):
    """A ``Qwen3ForCausalLM`` of ``cfg`` from ``seed`` whose norm weights are moved off 1, so that a swapped
    or missing norm in a conversion changes the outputs."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
