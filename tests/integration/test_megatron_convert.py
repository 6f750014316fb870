"""HF Qwen3 <-> megatron-core conversion on CPU (single process, TP=PP=1, fp32, local layer spec):
logits of the converted GPTModel equal HF's, the weight round trip is bit-exact, bad configs fail."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from support.megatron_cpu import megatron_on_cpu  # noqa: E402
from support.models import hf_model  # noqa: E402
from support.models import megatron_tiny_config as tiny_config  # noqa: E402
from support.net import free_port  # noqa: E402

from tempo_mega.backends.megatron import MegatronConfig  # noqa: E402
from tempo_mega.backends.megatron.convert import (  # noqa: E402
    hf_to_mcore_state_dict,
    mcore_to_hf_state_dict,
    to_transformer_config,
    validate_hf_config,
)

FP32 = MegatronConfig(params_dtype="float32")


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from tempo_mega.backends.megatron.model import init_parallel

    with megatron_on_cpu():
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        init_parallel(FP32)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_converted_gpt_model_matches_hf_logits(megatron_world, tied):
    from tempo_mega.backends.megatron.model import build_model

    cfg = tiny_config(tied)
    hf = hf_model(cfg)
    model, te_layout = build_model(cfg, FP32, role="actor")
    assert not te_layout
    missing, unexpected = model.load_state_dict(hf_to_mcore_state_dict(hf.state_dict(), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        out = model(input_ids=ids, position_ids=pos, attention_mask=None)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp_size", [1, 2])
def test_state_dict_round_trip_is_bit_exact(tied, tp_size):
    cfg = tiny_config(tied)
    sd = hf_model(cfg).state_dict()
    if tied:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    shards = [hf_to_mcore_state_dict(sd, cfg, r, tp_size) for r in range(tp_size)]
    back = mcore_to_hf_state_dict(shards, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_tp_shards_are_slices_of_the_full_tensor():
    cfg = tiny_config(False)
    sd = hf_model(cfg).state_dict()
    full = hf_to_mcore_state_dict(sd, cfg)
    r0, r1 = (hf_to_mcore_state_dict(sd, cfg, r, 2) for r in range(2))
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(torch.cat([r0[qkv], r1[qkv]]), full[qkv])  # whole query groups per rank
    fc1 = "decoder.layers.1.mlp.linear_fc1.weight"
    gate, up = full[fc1].chunk(2)
    assert torch.equal(r1[fc1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    # q/k/v of group 0 come first: the first H/G = 2 query heads, then one key and one value head
    assert torch.equal(full[qkv][:32], sd["model.layers.0.self_attn.q_proj.weight"][:32])
    assert torch.equal(full[qkv][32:48], sd["model.layers.0.self_attn.k_proj.weight"][:16])
    assert torch.equal(full[qkv][48:64], sd["model.layers.0.self_attn.v_proj.weight"][:16])


def test_critic_round_trip_and_pipeline_stages():
    cfg = tiny_config(True)
    trunk = {k: v for k, v in hf_model(cfg).state_dict().items() if k.startswith("model.")}
    sd = {**trunk, "value_head.weight": torch.randn(1, 64), "value_head.bias": torch.randn(1)}
    merged = {}
    for pp_rank in range(2):
        shards = [hf_to_mcore_state_dict(sd, cfg, r, 2, pp_rank=pp_rank, pp_size=2) for r in range(2)]
        assert all(k.startswith("decoder.layers.0.") for k in shards[0] if k.startswith("decoder.layers"))
        merged.update(mcore_to_hf_state_dict(shards, cfg, pp_rank=pp_rank, pp_size=2))
    assert set(merged) == set(sd)
    assert all(torch.equal(merged[k], sd[k]) for k in sd)


@pytest.mark.parametrize("field,value,match", [
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "qwen3_moe", "model_type"),
    ("num_experts", 8, "num_experts"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_hf_config_is_rejected(field, value, match):
    cfg = tiny_config(False).to_dict()
    cfg[field] = value
    with pytest.raises(ValueError, match=match):
        validate_hf_config(cfg)


def test_parallel_sizes_are_checked_against_the_model():
    with pytest.raises(ValueError, match="megatron.tensor_parallel_size=4 does not divide .*num_key_value_heads"):
        to_transformer_config(tiny_config(False), MegatronConfig(tensor_parallel_size=4, params_dtype="float32"))
    with pytest.raises(ValueError, match="megatron.pipeline_parallel_size"):
        to_transformer_config(tiny_config(False), MegatronConfig(pipeline_parallel_size=4, params_dtype="float32"))
    with pytest.raises(ValueError, match="megatron.sequence_parallel"):
        MegatronConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match="megatron.recompute"):
        MegatronConfig(recompute="sometimes")
    with pytest.raises(ValueError, match="world size 3"):
        MegatronConfig(tensor_parallel_size=2).data_parallel_size(3)
