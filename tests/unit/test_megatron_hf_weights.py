"""Checkpoint weights read tensor by tensor (``backends/megatron/hf_weights.py``) against the models
transformers and the torch backend load from the same directories."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tempo_mega.backends.megatron.hf_weights import CriticWeights, SafetensorsWeights, critic_weights
from tempo_mega.models.critic import ValueHeadModel


def tiny(tied: bool = False) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=16, vocab_size=64, intermediate_size=48,
                                        tie_word_embeddings=tied))


def assert_same(mapping, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(mapping) == sorted(reference) and len(mapping) == len(reference)
    for name, want in reference.items():
        got = mapping[name]
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_weights_match_the_loaded_model(tmp_path, sharded):
    tiny().save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    if sharded:
        files = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(files) > 1
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    lazy = SafetensorsWeights(tmp_path)
    assert_same(lazy, {k: v for k, v in loaded.state_dict().items()})
    assert "lm_head.weight" in lazy and "nope" not in lazy
    with pytest.raises(KeyError):
        lazy["model.layers.9.mlp.up_proj.weight"]
    bf16 = SafetensorsWeights(tmp_path, dtype=torch.bfloat16)
    assert bf16["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(bf16["model.norm.weight"], loaded.model.norm.weight.to(torch.bfloat16))


def test_missing_weights_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        SafetensorsWeights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="not a safetensors index"):
        SafetensorsWeights(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        critic_weights({}, tmp_path / "absent", hidden_size=32, seed=0)
    with pytest.raises(ValueError, match="value head lacks"):
        CriticWeights({}, {"value_head.weight": torch.zeros(1, 4)})


def test_critic_weights_are_the_torch_backends_critic(tmp_path):
    actor = tiny()
    actor.save_pretrained(tmp_path / "actor")
    lazy_actor = SafetensorsWeights(tmp_path / "actor")
    # no critic directory: the actor's trunk and a fresh head from the seed
    assert_same(critic_weights(lazy_actor, None, hidden_size=32, seed=7),
                ValueHeadModel.from_actor(actor, seed=7).state_dict())
    # a critic saved by ValueHeadModel (trunk names without "model.", a trained head)
    critic = ValueHeadModel.from_actor(actor, seed=3)
    with torch.no_grad():
        critic.value_head.weight.add_(1.0)
        critic.model.norm.weight.mul_(2.0)
    critic.save_pretrained(tmp_path / "critic")
    got = critic_weights(lazy_actor, tmp_path / "critic", hidden_size=32, seed=0)
    assert_same(got, ValueHeadModel.from_pretrained(tmp_path / "critic", dtype=torch.float32).state_dict())
    assert torch.equal(got["model.norm.weight"], critic.model.norm.weight)
    # an actor directory as the critic: its trunk, a fresh head (ValueHeadModel.from_pretrained does the same)
    assert_same(critic_weights(lazy_actor, tmp_path / "actor", hidden_size=32, seed=5),
                ValueHeadModel.from_pretrained(tmp_path / "actor", dtype=torch.float32, seed=5).state_dict())
    assert "lm_head.weight" not in critic_weights(lazy_actor, None, hidden_size=32, seed=0)
