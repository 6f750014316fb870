"""Model FLOPs and MFU: a Qwen3-8B case counted by hand, the MFU arithmetic, phase_mfu on a step."""

from __future__ import annotations

import types

import pytest

from tempo_mega.telemetry.flops import (
    PEAK_FLOPS,
    TransformerShape,
    forward_flops_per_token,
    generate_flops_per_token,
    mfu,
    param_counts,
    phase_mfu,
    train_flops_per_token,
)

QWEN3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 36,
    "intermediate_size": 12288,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}

# Qwen3-8B by hand.
# Per layer:
#   q_proj 4096 x (32*128 = 4096)  = 16,777,216
#   k_proj 4096 x ( 8*128 = 1024)  =  4,194,304
#   v_proj 4096 x 1024             =  4,194,304
#   o_proj 4096 x 4096             = 16,777,216
#   attention                      = 41,943,040
#   MLP gate, up, down 3 x 4096 x 12288 = 3 x 50,331,648 = 150,994,944
#   matmul weights per layer       = 192,937,984
# 36 layers: 36 x 192,937,984      = 6,945,767,424   (Qwen3-8B's "6.95B non-embedding")
# LM head (untied) 151936 x 4096   =   622,329,856   (the embedding is as large again)
# Norms: 36 x (2 x 4096 + 2 x 128) + 4096 = 36 x 8,448 + 4,096 = 308,224
# Total: 6,945,767,424 + 2 x 622,329,856 + 308,224 = 8,190,735,360   (~8.19B)
#
# Matmul N = 6,945,767,424 + 622,329,856 = 7,568,097,280
# Training FLOPs per token at T = 4096:
#   6 N                       = 45,408,583,680
#   12 L H Q T = 12 x 36 x 32 x 128 x 4096 = 7,247,757,312
#   sum                       = 52,656,340,992
HAND_TOTAL_PARAMS = 8_190_735_360
HAND_MATMUL_PARAMS = 7_568_097_280
HAND_TRAIN_FLOPS_T4096 = 52_656_340_992


def test_qwen3_8b_parameter_count_by_hand():
    counts = param_counts(QWEN3_8B)
    assert counts["attention_per_layer"] == 41_943_040
    assert counts["mlp_per_layer"] == 150_994_944
    assert counts["layers_matmul"] == 6_945_767_424
    assert counts["matmul"] == HAND_MATMUL_PARAMS
    assert counts["total"] == HAND_TOTAL_PARAMS
    # tied: one vocab x hidden matrix fewer parameters, the same matmul work
    tied = param_counts({**QWEN3_8B, "tie_word_embeddings": True})
    assert tied["total"] == HAND_TOTAL_PARAMS - 622_329_856
    assert tied["matmul"] == HAND_MATMUL_PARAMS


def test_qwen3_8b_train_flops_by_hand():
    assert train_flops_per_token(QWEN3_8B, seq_len=4096) == HAND_TRAIN_FLOPS_T4096
    # the critic: no LM head
    assert train_flops_per_token(QWEN3_8B, 4096, include_lm_head=False) == \
        HAND_TRAIN_FLOPS_T4096 - 6 * 622_329_856
    # forward only is a third: 2N + 4 L H Q T
    assert forward_flops_per_token(QWEN3_8B, 4096) == pytest.approx(
        2 * HAND_MATMUL_PARAMS + 4 * 36 * 32 * 128 * 4096, rel=1e-15)


def test_generation_charges_the_mean_kv_length():
    # prompt 100, response 51 tokens: token i attends to 100 + i keys, mean 100 + 26 = 126
    want = 2 * HAND_MATMUL_PARAMS + 4 * 36 * 32 * 128 * 126
    assert generate_flops_per_token(QWEN3_8B, prompt_len=100, response_len=51) == pytest.approx(want, rel=1e-15)
    mean_kv = sum(100 + i for i in range(1, 52)) / 51
    assert mean_kv == 126


def test_config_objects_and_defaults():
    hf_like = types.SimpleNamespace(**{**QWEN3_8B, "head_dim": None})  # head_dim None -> hidden / heads
    assert TransformerShape.of(hf_like) == TransformerShape(**QWEN3_8B)
    with pytest.raises(ValueError, match="vocab_size"):
        train_flops_per_token({k: v for k, v in QWEN3_8B.items() if k != "vocab_size"}, 128)


def test_attention_width_is_heads_times_head_dim_not_hidden():
    # Qwen3-0.6B: hidden 1024 but 16 heads x 128 = 2048 attention width
    small = {"hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "vocab_size": 151936, "tie_word_embeddings": True}
    delta = train_flops_per_token(small, 1001) - train_flops_per_token(small, 1000)
    assert delta == 12 * 28 * 16 * 128
    # 1024*2048 (q) + 2*1024*1024 (k, v) + 2048*1024 (o) + 3*1024*3072 (MLP) per layer
    assert param_counts(small)["layers_matmul"] == 28 * (2 * 1024 * 2048 + 2 * 1024 * 1024 + 3 * 1024 * 3072)
    assert param_counts(small)["total"] == pytest.approx(0.596e9, rel=0.01)  # "0.6B"


def test_mfu_arithmetic():
    # 8 GPUs x 989 TFLOP/s for 2 s is 15.824 PFLOP; 7.912 PFLOP of model work is half of it
    assert mfu(7.912e15, 2.0, 8, 989e12) == pytest.approx(0.5, rel=1e-12)
    assert mfu(989e12, 1.0, 1, "h100_sxm_bf16") == pytest.approx(1.0)
    assert PEAK_FLOPS["h200_bf16"] == PEAK_FLOPS["h100_sxm_bf16"] == 989e12
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1, 989e12)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0, 989e12)
    with pytest.raises(ValueError, match="unknown peak"):
        mfu(1.0, 1.0, 1, "tpu")


def test_phase_mfu_on_a_step():
    # 64 samples of 1024 tokens (256 prompt + 768 response) on 8 GPUs, actor and critic Qwen3-8B
    samples, seq, resp = 64, 1024, 768
    tokens = samples * seq
    metrics = {
        "perf/num_tokens": float(tokens), "rollout/num_samples": float(samples),
        "rollout/response_len_mean": float(resp), "rollout/gen_batches": 1.0, "rollout/labeled_frac": 0.25,
        "perf/tokens_per_s": 4000.0, "critic/updated": 1.0,
        "timing/rollout_s": 30.0, "timing/logprob_s": 4.0, "timing/e_step_s": 5.0,
        "timing/m_step_s": 12.0, "timing/weight_sync_s": 1.0, "timing/step_s": 53.0,
    }
    peak, gpus = 989e12, 8
    # every FLOP count written out from the formula: N = 7,568,097,280 (actor), N - 622,329,856 (critic)
    n_actor, n_critic, lhq = 7_568_097_280, 7_568_097_280 - 622_329_856, 36 * 32 * 128
    fwd_actor = 2 * n_actor + 4 * lhq * seq
    fwd_critic = 2 * n_critic + 4 * lhq * seq
    logprob = tokens * (fwd_actor + fwd_critic)
    e_step = tokens * 3 * fwd_critic
    m_step = tokens * 3 * fwd_actor
    rollout = samples * resp * (2 * n_actor + 4 * lhq * (256 + (resp + 1) / 2))
    out = phase_mfu(metrics, QWEN3_8B, QWEN3_8B, gpus, peak)
    assert out["perf/mfu_logprob"] == pytest.approx(logprob / (4.0 * gpus * peak), rel=1e-12)
    assert out["perf/mfu_e_step"] == pytest.approx(e_step / (5.0 * gpus * peak), rel=1e-12)
    assert out["perf/mfu_m_step"] == pytest.approx(m_step / (12.0 * gpus * peak), rel=1e-12)
    assert out["perf/mfu_rollout"] == pytest.approx(rollout / (30.0 * gpus * peak), rel=1e-12)
    assert out["perf/mfu"] == pytest.approx((logprob + e_step + m_step + rollout) / (53.0 * gpus * peak), rel=1e-12)
    assert out["perf/tokens_per_s_per_gpu"] == 500.0
    assert 0 < out["perf/mfu_m_step"] < 1

    # TEMPO's E-step on labeled rows only, two actor epochs
    tempo = phase_mfu(metrics, QWEN3_8B, QWEN3_8B, gpus, "h100_sxm_bf16", actor_epochs=2, critic_labeled_only=True)
    assert tempo["perf/mfu_e_step"] == pytest.approx(out["perf/mfu_e_step"] * 0.25, rel=1e-12)
    assert tempo["perf/mfu_m_step"] == pytest.approx(out["perf/mfu_m_step"] * 2, rel=1e-12)

    # frozen critic, refilled rollout: no E-step or rollout MFU
    frozen = phase_mfu({**metrics, "critic/updated": 0.0, "rollout/gen_batches": 2.0}, QWEN3_8B, QWEN3_8B, gpus, peak)
    assert "perf/mfu_e_step" not in frozen and "perf/mfu_rollout" not in frozen
    assert frozen["perf/mfu_m_step"] == out["perf/mfu_m_step"]

    # without token counts only the per-GPU throughput is left
    assert phase_mfu({"perf/tokens_per_s": 80.0}, QWEN3_8B, QWEN3_8B, 8, peak) == {"perf/tokens_per_s_per_gpu": 10.0}
