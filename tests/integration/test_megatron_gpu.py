"""The Megatron backend's GPU-only paths, on one CUDA GPU (marked ``gpu``: skipped on CPU machines):
Transformer Engine's layer spec with THD packed attention against the torch backend, and FP8 against
bf16 on the critic's values. Run them with ``pytest -m gpu tests/integration/test_megatron_gpu.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from support.megatron_cpu import one_process_world  # noqa: E402

pytestmark = pytest.mark.gpu


def _te_or_skip():
    from tempo_mega.backends.megatron.model import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("Transformer Engine is not installed")


@pytest.fixture
def gpu_world(monkeypatch):
    """A 1-process NCCL world, brought up by the backend (init_parallel) and torn down here."""
    with one_process_world(monkeypatch, cpu=False):
        yield


def _config():
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, vocab_size=512, intermediate_size=512, max_position_embeddings=256,
                       tie_word_embeddings=False)


def _batch(gen: torch.Generator):
    from tempo_mega.batch import RolloutBatch

    prompts = [[int(x) for x in torch.randint(1, 512, (n,), generator=gen)] for n in (7, 19, 3, 12)]
    responses = [[int(x) for x in torch.randint(1, 512, (n,), generator=gen)] for n in (21, 5, 30, 9)]
    b = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 4, group_ids=[0, 0, 1, 1], pad_token_id=0)
    b.advantages = torch.randn(b.response_mask.shape, generator=gen)
    b.returns = torch.randn(b.response_mask.shape, generator=gen)
    return b


def _pg_loss(logprobs, micro):
    mask = micro.response_mask.bool()
    return -(logprobs * micro.advantages.to(logprobs.device))[mask].sum() / mask.sum(), {}


_pg_loss.agg = "token"


def test_te_thd_spec_matches_torch_backend(gpu_world):
    """TE layers with THD packed attention (bf16: TE's fused attention kernels) give the torch backend's
    log-probs and values on left-padded rows of different lengths, within bf16 rounding, and train."""
    _te_or_skip()
    from transformers import Qwen3ForCausalLM

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig, ValueHeadModel, build_actor, build_critic

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(_config()).eval()
    critic_hf = ValueHeadModel.from_actor(Qwen3ForCausalLM(_config()), seed=1)
    batch = _batch(torch.Generator().manual_seed(2))
    optim = OptimConfig(lr=1e-4, mini_batch_size=2, max_tokens_per_micro_batch=48, grad_clip=1.0)
    mc = MegatronConfig(params_dtype="bfloat16")
    actor = MegatronBackend("actor", hf.config, mc, optim, hf_state_dict=hf.state_dict(), use_te=True)
    critic = MegatronBackend("critic", hf.config, mc, optim, hf_state_dict=critic_hf.state_dict(), use_te=True)
    assert actor.te_layout
    cuda = torch.device("cuda")
    ref_actor = build_actor(hf.to(torch.bfloat16), optim, dtype=torch.bfloat16, device=cuda)
    ref_critic = build_critic(critic_hf, optim, device=cuda)
    lp, ref_lp = actor.forward_logprobs(batch), ref_actor.forward_logprobs(batch)
    torch.testing.assert_close(lp, ref_lp, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(critic.forward_values(batch), ref_critic.forward_values(batch), atol=5e-2, rtol=2e-2)
    metrics = actor.train_step(batch, _pg_loss)
    assert metrics["actor/num_optimizer_steps"] == 2.0 and metrics["actor/grad_norm"] > 0
    assert not torch.equal(actor.forward_logprobs(batch), lp)


def test_fp8_critic_values_track_bf16(gpu_world):
    """FP8 GEMMs (hybrid, delayed scaling) on the same bf16 weights: the critic's values stay within a
    few percent (relative RMS) of bf16 on the same batch."""
    _te_or_skip()
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    from transformers import Qwen3ForCausalLM

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig, ValueHeadModel

    torch.manual_seed(0)
    critic_hf = ValueHeadModel.from_actor(Qwen3ForCausalLM(_config()), seed=1)
    batch = _batch(torch.Generator().manual_seed(2))
    optim = OptimConfig(lr=1e-5, mini_batch_size=4, max_tokens_per_micro_batch=256)
    bf16 = MegatronBackend("critic", critic_hf.config, MegatronConfig(params_dtype="bfloat16"), optim,
                           hf_state_dict=critic_hf.state_dict(), use_te=True)
    weights = dict(bf16.export_weights(dtype=None))
    fp8 = MegatronBackend("critic", critic_hf.config, MegatronConfig(params_dtype="bfloat16", fp8="hybrid"), optim,
                          hf_state_dict=weights, use_te=True)
    fp8.forward_values(batch)  # delayed scaling takes its scales from the passes before
    ref, got = bf16.forward_values(batch), fp8.forward_values(batch)
    mask = batch.response_mask.bool()
    rel = float((got - ref)[mask].pow(2).mean().sqrt() / ref[mask].pow(2).mean().sqrt())
    assert rel < 0.1, rel


def test_fusions_keep_the_numbers(gpu_world):
    """megatron.fusions (weight-gradient accumulation fusion, fused SwiGLU, bias-dropout-add and RoPE) give
    the unfused layers' log-probs and a train step's loss and grad norm within bf16 rounding."""
    _te_or_skip()
    from transformers import Qwen3ForCausalLM

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(_config()).eval()
    batch = _batch(torch.Generator().manual_seed(2))
    optim = OptimConfig(lr=1e-4, mini_batch_size=2, max_tokens_per_micro_batch=48, grad_clip=1.0)
    got = {}
    for fusions in (False, True):
        actor = MegatronBackend("actor", hf.config, MegatronConfig(params_dtype="bfloat16", fusions=fusions), optim,
                                hf_state_dict=hf.state_dict(), use_te=True)
        assert actor.chunks[0].config.gradient_accumulation_fusion == fusions
        lp = actor.forward_logprobs(batch).float().cpu()
        m = actor.train_step(batch, _pg_loss)
        got[fusions] = (lp, m["actor/loss"], m["actor/grad_norm"])
    mask = batch.response_mask.bool()
    torch.testing.assert_close(got[True][0][mask], got[False][0][mask], atol=5e-2, rtol=0)
    assert got[True][1] == pytest.approx(got[False][1], abs=5e-2)
    assert got[True][2] == pytest.approx(got[False][2], rel=5e-2)


@pytest.mark.parametrize("dispatcher,grouped", [("alltoall", False), ("alltoall", True)],
                         ids=["alltoall", "alltoall-grouped-gemm"])
def test_moe_gpu_dispatch_and_grouped_gemm_match_allgather(gpu_world, dispatcher, grouped):
    """The GPU-only MoE paths (megatron's all-to-all dispatcher, Transformer Engine's grouped GEMM) give
    the log-probs and the post-step log-probs of the sequential experts behind the allgather dispatcher,
    on the same weights, in float32."""
    from support.models import hf_moe_model, moe_checkpoint_state_dict, tiny_qwen3_moe_config

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig

    if grouped:
        _te_or_skip()
    cfg = tiny_qwen3_moe_config()
    sd = moe_checkpoint_state_dict(hf_moe_model(cfg))
    gen = torch.Generator().manual_seed(0)
    batch = _batch(gen)
    batch.input_ids = batch.input_ids % cfg.vocab_size
    optim = OptimConfig(lr=1e-3, max_tokens_per_micro_batch=64)

    def run(**keys):
        b = MegatronBackend("actor", cfg, MegatronConfig(params_dtype="float32", **keys), optim, hf_state_dict=sd,
                            use_te=bool(keys.get("moe_grouped_gemm")) or None)
        before = b.forward_logprobs(batch)
        b.train_step(batch, _pg_loss)
        return before, b.forward_logprobs(batch)

    ref = run(moe_token_dispatcher="allgather")
    got = run(moe_token_dispatcher=dispatcher, moe_grouped_gemm=grouped)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, atol=2e-4, rtol=2e-4)
