"""``models.moe_names.to_module_names``: a Qwen3-MoE's per-expert checkpoint names, in any order within a
layer, become exactly the fused tensors transformers holds; other names pass through; a stream that ends
with a layer's experts incomplete is refused, naming the layer."""

from __future__ import annotations

import random

import pytest
import torch
from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config

from tempo_mega.models.moe_names import to_module_names


def test_per_expert_names_become_the_modules_fused_tensors():
    model = hf_moe_model(tiny_qwen3_moe_config())
    targets = model.state_dict()
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in targets)  # transformers fuses them in memory
    items = list(moe_checkpoint_state_dict(model).items())
    random.Random(0).shuffle(items)  # an exporter's order: experts of every EP rank, interleaved
    items.sort(key=lambda kv: kv[0].split(".mlp.")[0])  # ... one layer after another
    got = dict(to_module_names(items, targets))
    assert got.keys() == targets.keys()
    for name, t in targets.items():
        assert torch.equal(got[name], t), name


def test_fused_and_dense_names_pass_through_and_incomplete_experts_are_refused():
    model = hf_moe_model(tiny_qwen3_moe_config())
    targets = model.state_dict()
    assert dict(to_module_names(targets.items(), targets)).keys() == targets.keys()
    sd = moe_checkpoint_state_dict(model)
    del sd["model.layers.1.mlp.experts.3.down_proj.weight"]
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts' ended incomplete: 11 of 12"):
        dict(to_module_names(sd.items(), targets))
