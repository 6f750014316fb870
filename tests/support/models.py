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


def _seeded(cls, cfg, seed: int, redraw=lambda name: False):
    """``cls(cfg)`` from ``seed`` in eval mode, its norm weights moved off 1 (so that a swapped or missing
    norm in a conversion changes the outputs) and the parameters ``redraw(name)`` picks drawn N(0, 0.2)."""
    import torch

    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if redraw(name):
                p.normal_(0.0, 0.2)
    return model


def hf_model(cfg, seed: int = 0):
    """A ``Qwen3ForCausalLM`` of ``cfg`` from ``seed``, norms moved off 1."""
    from transformers import Qwen3ForCausalLM

    return _seeded(Qwen3ForCausalLM, cfg, seed)


def tiny_qwen3_moe_config(experts: int = 4, top_k: int = 2, layers: int = 2, norm_topk_prob: bool = True):
    """A ``Qwen3MoeConfig`` of the tiny shape (4 experts, top-2, 2 layers by default; every layer sparse,
    as in the released Qwen3-MoE models)."""
    from transformers import Qwen3MoeConfig

    base = {k: v for k, v in tiny_shape().items() if k != "rope_theta"}
    return Qwen3MoeConfig(**{**base, "vocab_size": 128, "num_hidden_layers": layers, "max_position_embeddings": 64,
                             "intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": experts,
                             "num_experts_per_tok": top_k, "norm_topk_prob": norm_topk_prob,
                             "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})


def hf_moe_model(cfg, seed: int = 0):
    """A ``Qwen3MoeForCausalLM`` of ``cfg`` from ``seed``, norms moved off 1 and a router (and experts) not
    as transformers initialises them: a zero router would route by index and hide a swapped expert."""
    from transformers import Qwen3MoeForCausalLM

    return _seeded(Qwen3MoeForCausalLM, cfg, seed, lambda name: name.endswith("mlp.gate.weight") or "experts" in name)


def moe_checkpoint_state_dict(model) -> dict:
    """A Qwen3-MoE's weights under its checkpoint names (one tensor per expert), as its safetensors
    files and SGLang name them; transformers >= 5 fuses the experts in memory."""
    out = {}
    for name, t in model.state_dict().items():
        head, _, tail = name.rpartition("mlp.experts.")
        if tail == "gate_up_proj":
            for e, w in enumerate(t):
                gate, up = w.chunk(2, dim=0)
                out[f"{head}mlp.experts.{e}.gate_proj.weight"] = gate.clone()
                out[f"{head}mlp.experts.{e}.up_proj.weight"] = up.clone()
        elif tail == "down_proj":
            for e, w in enumerate(t):
                out[f"{head}mlp.experts.{e}.down_proj.weight"] = w.clone()
        else:
            out[name] = t
    return out


def _forced_gate(gate, forced):
    """A module standing in for a Qwen3-MoE layer's router (``mlp.gate``) in a test: it routes every token
    to the experts ``forced`` names ([tokens, k]; rows of -1 route as the router would), with the router's
    own gate weights over those experts (softmax, gathered, renormalised when ``norm_topk_prob``): what
    routing replay means."""
    import torch

    class ForcedGate(torch.nn.Module):
        def forward(self, hidden):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float)
            own = probs.topk(gate.top_k, dim=-1).indices
            idx = torch.where(forced[:, :1] >= 0, forced, own)
            weights = probs.gather(1, idx)
            if gate.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(logits.dtype), idx

    return ForcedGate()


def hf_logprobs_with_routing(model, prompt, response, routed):
    """[len(response)] float32 log-probs of ``response`` after ``prompt`` under the HF Qwen3-MoE ``model``
    with its routers forced to ``routed`` ([len(prompt) + len(response) - 1, layers, k]; the last token
    routes as the router would), one sequence, no padding: an independent reference for routing replay."""
    import torch

    ids = torch.tensor([list(prompt) + list(response)])
    n = ids.shape[1]
    layers = model.model.layers
    saved = [layer.mlp.gate for layer in layers]
    try:
        for i, layer in enumerate(layers):
            forced = torch.full((n, routed.shape[2]), -1, dtype=torch.long)
            forced[: n - 1] = routed[:, i].long()
            layer.mlp.gate = _forced_gate(saved[i], forced)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
    finally:
        for layer, gate in zip(layers, saved):
            layer.mlp.gate = gate
    lp = torch.log_softmax(logits[len(prompt) - 1 : n - 1], dim=-1)
    return lp.gather(1, ids[0, len(prompt):, None])[:, 0]
