"""Qwen3-MoE expert weights between their checkpoint names and a transformers module's.

Checkpoints, SGLang and every exporter here name each expert's weights on their own
(``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``); transformers >= 5 holds a layer's experts
fused (``mlp.experts.gate_up_proj`` [E, 2F, H] = [gate; up] per expert, ``mlp.experts.down_proj``
[E, H, F]). ``to_module_names`` turns a stream of the first into what a module's ``state_dict`` holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

_EXPERT = re.compile(r"^(?P<layer>.+\.mlp\.experts\.)(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def to_module_names(named_tensors: Iterable[tuple[str, Tensor]],
                    targets: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """``named_tensors`` with per-expert names fused where ``targets`` (a module's state dict) holds the
    layer's experts fused; every other tensor passes through as it comes. A layer's experts are
    buffered until all of its experts have arrived (one layer at a time in an exporter's order); a
    stream that ends with a layer incomplete raises ``ValueError`` naming it."""
    pending: dict[str, dict[tuple[int, str], Tensor]] = {}
    for name, t in named_tensors:
        m = _EXPERT.match(name)
        layer = m["layer"] if m else ""
        if m is None or name in targets or layer + "gate_up_proj" not in targets:
            yield name, t
            continue
        buf = pending.setdefault(layer, {})
        buf[(int(m["e"]), m["proj"])] = t
        experts = targets[layer + "gate_up_proj"].shape[0]
        if len(buf) == 3 * experts:
            del pending[layer]
            yield layer + "gate_up_proj", torch.stack(
                [torch.cat([buf[(e, "gate_proj")], buf[(e, "up_proj")]], dim=0) for e in range(experts)])
            yield layer + "down_proj", torch.stack([buf[(e, "down_proj")] for e in range(experts)])
    if pending:
        layer, buf = next(iter(pending.items()))
        raise ValueError(f"expert weights of {layer[:-1]!r} ended incomplete: {len(buf)} of "
                         f"{3 * targets[layer + 'gate_up_proj'].shape[0]} tensors")
