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
    ("model_type", "llama", "model_type"),
    ("model_type", "qwen3_moe", "num_experts=None"),  # a dense config named a mixture of experts
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


# ---------------------------------------------------------------------------------------------- Qwen3-MoE
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_converted_moe_model_matches_hf_logits(megatron_world, norm_topk_prob):
    """A tiny Qwen3-MoE (4 experts, top-2) through megatron's MoE layer (router, sequential experts, the
    allgather dispatcher: the alltoall one needs CUDA streams) gives HF ``Qwen3MoeForCausalLM``'s logits,
    from the checkpoint names and from transformers' fused in-memory names alike."""
    from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config

    from tempo_mega.backends.megatron.model import build_model

    cfg = tiny_qwen3_moe_config(norm_topk_prob=norm_topk_prob)
    hf = hf_moe_model(cfg)
    model, _ = build_model(cfg, FP32, role="actor", moe_token_dispatcher_type="allgather")
    assert len(model.decoder.layers[0].mlp.experts.local_experts) == 4
    checkpoint = hf_to_mcore_state_dict(moe_checkpoint_state_dict(hf), cfg)
    fused = hf_to_mcore_state_dict(hf.state_dict(), cfg)
    assert checkpoint.keys() == fused.keys() and all(torch.equal(checkpoint[k], fused[k]) for k in fused)
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the experts matter: a swapped pair of experts changes the logits
    swapped = dict(checkpoint)
    a, b = (f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in (0, 1))
    swapped[a], swapped[b] = checkpoint[b], checkpoint[a]
    model.load_state_dict(swapped, strict=False)
    with torch.no_grad():
        moved = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
    assert (moved - ref).abs().max() > 1e-3


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("tp_size,ep_size,expert_tp", [(1, 1, True), (2, 1, True), (1, 2, True), (2, 2, True),
                                                        (2, 2, False), (1, 4, True)])
def test_moe_round_trip_is_bit_exact_over_tp_ep_and_layouts(tp_size, ep_size, expert_tp, grouped):
    """HF -> the shards of every (TP, EP) rank -> HF gives every checkpoint tensor back bit for bit, and
    each EP rank holds only its own experts, each TP rank its slice of them (or all of it, expert TP 1)."""
    from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config

    cfg = tiny_qwen3_moe_config()
    sd = moe_checkpoint_state_dict(hf_moe_model(cfg))
    back: dict = {}
    for ep in range(ep_size):
        shards = [hf_to_mcore_state_dict(sd, cfg, tp, tp_size, ep_rank=ep, ep_size=ep_size, expert_tp=expert_tp,
                                         grouped_gemm=grouped) for tp in range(tp_size)]
        fc1 = [k for k in shards[0] if "linear_fc1.weight" in k and "layers.0." in k and "experts" in k]
        assert len(fc1) == 4 // ep_size
        full_rows = 2 * cfg.moe_intermediate_size
        assert shards[0][fc1[0]].shape[0] == (full_rows // tp_size if expert_tp else full_rows)
        back.update(mcore_to_hf_state_dict(shards, cfg, ep_rank=ep, ep_size=ep_size, expert_tp=expert_tp))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_moe_expert_of_ep_rank_is_the_global_expert():
    """EP rank 1 of 2 holds global experts 2 and 3 as its local 0 and 1."""
    from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config

    cfg = tiny_qwen3_moe_config()
    sd = moe_checkpoint_state_dict(hf_moe_model(cfg))
    mc = hf_to_mcore_state_dict(sd, cfg, ep_rank=1, ep_size=2)
    fc2 = mc["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]
    assert torch.equal(fc2, sd["model.layers.1.mlp.experts.2.down_proj.weight"])
    assert torch.equal(mc["decoder.layers.1.mlp.router.weight"], sd["model.layers.1.mlp.gate.weight"])


@pytest.mark.parametrize("key,value,match", [
    ("decoder_sparse_step", 2, "decoder_sparse_step=2"),
    ("mlp_only_layers", [0], "mlp_only_layers"),
    ("num_experts_per_tok", 5, "top-k"),
])
def test_moe_configs_it_cannot_map_are_refused(key, value, match):
    from support.models import tiny_qwen3_moe_config

    cfg = tiny_qwen3_moe_config()
    setattr(cfg, key, value)
    with pytest.raises(ValueError, match=match):
        validate_hf_config(cfg)


def test_expert_parallel_size_must_divide_the_experts():
    from support.models import tiny_qwen3_moe_config

    from tempo_mega.backends.megatron import MegatronConfig

    with pytest.raises(ValueError, match="megatron.expert_model_parallel_size=3 does not divide the model's num_experts=4"):
        to_transformer_config(tiny_qwen3_moe_config(), MegatronConfig(params_dtype="float32", expert_model_parallel_size=3))
    with pytest.raises(ValueError, match="does not divide num_experts=4"):  # an override past the config's check
        to_transformer_config(tiny_qwen3_moe_config(), FP32, expert_model_parallel_size=3)
    with pytest.raises(ValueError, match="not divisible by megatron.expert_tensor_parallel_size"):
        MegatronConfig(expert_model_parallel_size=4).data_parallel_size(2)


def test_moe_with_tensor_parallel_needs_sequence_parallel():
    from support.models import tiny_qwen3_moe_config

    from tempo_mega.backends.megatron import MegatronConfig

    with pytest.raises(ValueError, match="megatron.sequence_parallel must be true for a mixture of experts"):
        to_transformer_config(tiny_qwen3_moe_config(), MegatronConfig(params_dtype="float32", tensor_parallel_size=2))


@pytest.mark.parametrize(("keys", "match"), [
    ({}, "moe_token_dispatcher=alltoall needs a GPU"),  # the default dispatcher
    ({"moe_token_dispatcher": "allgather", "moe_grouped_gemm": True}, "moe_grouped_gemm=true needs a GPU"),
])
def test_moe_options_this_machine_cannot_run_are_refused_by_key(megatron_world, keys, match):
    from support.models import tiny_qwen3_moe_config

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend

    if torch.cuda.is_available():
        pytest.skip("on a GPU these options run")
    with pytest.raises(ValueError, match=match):
        MegatronBackend("actor", tiny_qwen3_moe_config(), MegatronConfig(params_dtype="float32", **keys))
