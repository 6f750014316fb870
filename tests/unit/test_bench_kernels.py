"""scripts/bench_kernels.py's bandwidth model: the minimum bytes per kernel and direction, worked by hand for
one shape each; t_min at the card's peak and % of peak; the card choice; the CSV row's columns; the
CPU wiring check."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "scripts" / "bench_kernels.py")
bk = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("bench_kernels", bk)  # dataclasses look their module up there
_spec.loader.exec_module(bk)


def test_value_head_bytes():
    n, h = 131_072, 5_120  # bf16 hidden, fp32 norm and head weights
    fwd = (n * h * 2  # hidden
           + 2 * 4 * h  # norm weight + head weight
           + 4  # bias
           + 4 * n  # values out
           + 2 * 4 * n)  # rstd, dot saved
    bwd = (n * h * 2  # hidden again
           + 2 * 4 * n  # rstd, dot
           + 4 * n  # dL/dvalues
           + 2 * 4 * h  # both weights
           + n * h * 2  # dL/dhidden out
           + 2 * 4 * h)  # dL/dnorm_weight, dL/dhead_weight out
    assert fwd == 1_343_791_108 and bwd == 2_686_009_344
    dims = {"N": n, "H": h}
    assert bk.min_bytes("fused_value_head", dims, 2, "fwd") == fwd
    assert bk.min_bytes("fused_value_head", dims, 2, "bwd") == bwd
    assert bk.bytes_moved("fused_value_head", dims, 2, "fwd") == fwd
    assert bk.bytes_moved("fused_value_head", dims, 2, "fwd+bwd") == fwd + bwd


def test_gspo_bytes():
    n, s = 16_384 * 64, 64  # 64 sequences of 16K tokens, fp32
    fwd = 3 * 4 * n + 4 * (s + 1) + 2 * 4 * s  # logp, old, adv in; cu_seqlens; log-ratio, loss per sequence out
    bwd = 4 * n + 4 * (s + 1) + 4 * s + 4 * n  # adv, cu_seqlens, log-ratio in; dL/dlogp out
    assert (fwd, bwd) == (12_583_684, 8_389_124)
    assert bk.min_bytes("gspo_loss", {"N": n, "S": s}, 4, "fwd") == fwd
    assert bk.bytes_moved("gspo_loss", {"N": n, "S": s}, 4, "fwd+bwd") == fwd + bwd


def test_value_loss_bytes():
    n, s = 16_384 * 64, 64
    fwd = 3 * 4 * n + 4 * (s + 1) + 3 * 4 * s  # values, old, returns; cu; delta, clipped-error sum, loss
    bwd = 2 * 4 * n + 4 * (s + 1) + 2 * 4 * s + 4 * n  # values, returns; cu; delta, sum; dL/dvalues out
    assert (fwd, bwd) == (12_583_940, 12_583_684)
    assert bk.min_bytes("seq_clipped_value_loss", {"N": n, "S": s}, 4, "fwd") == fwd
    assert bk.min_bytes("seq_clipped_value_loss", {"N": n, "S": s}, 4, "bwd") == bwd


@pytest.mark.parametrize("h", [4_096, 5_120])
def test_logprob_bytes(h):
    n, v = 16_384, 151_936  # bf16 hidden and weight
    fwd = n * h * 2 + v * h * 2 + 8 * n + 4 * n + 4 * n  # hidden, weight, int64 targets in; logp, lse out
    bwd = (n * h * 2 + v * h * 2 + 8 * n  # the same inputs again
           + 4 * n + 4 * n  # lse, dL/dlogp
           + n * h * 2 + v * h * 2)  # dL/dhidden, dL/dweight out
    dims = {"N": n, "H": h, "V": v, "entropy": 0}
    assert bk.min_bytes("fused_linear_logprob", dims, 2, "fwd") == fwd
    assert bk.min_bytes("fused_linear_logprob", dims, 2, "bwd") == bwd
    ent = {**dims, "entropy": 1}  # + entropy out; + entropy and its gradient in
    assert bk.min_bytes("fused_linear_logprob", ent, 2, "fwd") == fwd + 4 * n
    assert bk.min_bytes("fused_linear_logprob", ent, 2, "bwd") == bwd + 8 * n
    if h == 4_096:
        assert fwd == 1_379_139_584


def test_unknown_kernel_and_direction():
    with pytest.raises(ValueError):
        bk.min_bytes("nope", {}, 2, "fwd")
    with pytest.raises(ValueError):
        bk.min_bytes("gspo_loss", {"N": 1, "S": 1}, 4, "both")
    with pytest.raises(ValueError):
        bk.bytes_moved("gspo_loss", {"N": 1, "S": 1}, 4, "bwd")


def test_time_at_peak():
    assert bk.time_at_peak_ms(4.8e9, 4.8e12) == pytest.approx(1.0)  # 4.8 GB at 4.8 TB/s: 1 ms
    assert bk.time_at_peak_ms(3.35e9, 3.35e12) == pytest.approx(1.0)


def test_cards_come_from_the_plan_table():
    from tempo_mega.plan import CARDS

    assert bk.resolve_card(None) == "h200-141gb"  # no GPU: H200
    assert bk.resolve_card("h100") == "h100-80gb" and bk.resolve_card("A100") == "a100-80gb"
    assert bk.resolve_card("b200") == "b200" and bk.resolve_card("h200-141gb") == "h200-141gb"
    assert bk.resolve_card(None, "NVIDIA H200") == "h200-141gb"
    assert bk.resolve_card(None, "NVIDIA H100 80GB HBM3") == "h100-80gb"
    assert bk.resolve_card(None, "NVIDIA B200") == "b200"
    assert bk.resolve_card(None, "NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert {k: CARDS[bk.resolve_card(k)].hbm_bytes_per_s for k in ("h200", "h100", "a100", "b200")} == {
        "h200": 4.8e12, "h100": 3.35e12, "a100": 2.039e12, "b200": 8.0e12}
    with pytest.raises(ValueError):
        bk.resolve_card("v100")


def test_row_has_the_model_columns():
    case = bk.Case("fused_value_head", {"N": 16_384, "H": 4_096}, torch.bfloat16, None, None, None, ("hidden",))
    nbytes = bk.bytes_moved("fused_value_head", case.dims, 2, "fwd")
    t_min = nbytes / 4.8e12 * 1e3
    row = bk.make_row(case, "fwd", "h200-141gb", 4.8e12, ms=2 * t_min)
    assert row["bytes"] == nbytes and row["t_min_ms"] == pytest.approx(t_min)
    assert row["pct_peak"] == pytest.approx(50.0)
    assert row["gbps"] == pytest.approx(2400.0)
    assert row["card"] == "h200-141gb" and row["peak_gbps"] == pytest.approx(4800.0)
    assert math.isnan(row["tflops"])
    # the CSV writes the row's keys as its header
    assert {"bytes", "t_min_ms", "pct_peak", "card", "peak_gbps"} <= set(row)


def test_model_table_prints_without_a_gpu(capsys):
    assert bk.main(["--model", "--card", "h100", "--kernels", "fused_value_head", "--modes", "fwd"]) == 0
    out = capsys.readouterr().out
    assert "h100-80gb, 3.35 TB/s" in out
    nbytes = bk.bytes_moved("fused_value_head", {"N": 16_384, "H": 4_096}, 2, "fwd")
    assert f"| fused_value_head | N=16384 H=4096 | bfloat16 | fwd | {nbytes / 1e6:.1f} | " \
           f"{nbytes / 3.35e12 * 1e6:.1f} |" in out


def test_check_runs_at_toy_shapes(capsys):
    if not bk.torch.cuda.is_available():
        from tempo_mega.kernels._common import interpreting

        if not interpreting():
            pytest.skip("the CPU wiring check runs the Triton path in the interpreter (TRITON_INTERPRET=1)")
    assert bk.main(["--check", "--kernels", "fused_value_head", "gspo_loss"]) == 0
    assert "ok fused_value_head" in capsys.readouterr().out
