"""scripts/bench_train_step.py on CPU at a toy shape: its main() drives the real MegatronBackend (one
process, gloo, through the test-only CUDA shim) and the torch baseline; every bf16 row comes back
measured with positive, finite and self-consistent numbers, and the FP8 rows are reported as skipped
(no CUDA, no Transformer Engine here), never filled in. Wiring only: no timing is asserted.

The critic value-regression section: its FP8 comparison says skipped (no number), and the bf16-vs-bf16
comparison (``--value-check-baseline``) runs the same machinery: a second critic built from the first
one's exported weights gives exactly the same values at step 0, and finite numbers after training.
That proves the comparison, not FP8."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

from support.megatron_cpu import one_process_world  # noqa: E402

from tempo_mega.telemetry.flops import forward_flops_per_token, train_flops_per_token  # noqa: E402

TOY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "vocab_size": 256, "num_hidden_layers": 2, "tie_word_embeddings": False}
SEQ_LEN, SEQS = 32, 2
VALUE_STEPS = 2


def load_script():
    """scripts/bench_train_step.py as a module (registered first: its dataclasses look themselves up)."""
    name = "bench_train_step"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "bench_train_step.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def megatron_world(monkeypatch):
    """A 1-process torchrun world (the backend brings it up, the script takes it down)."""
    with one_process_world(monkeypatch):
        yield


def test_bench_train_step_cpu_smoke(tmp_path, megatron_world, capsys):
    pytest.importorskip("megatron.core")
    import torch.distributed as dist

    bench = load_script()
    out_csv = tmp_path / "bench.csv"
    rc = bench.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                     "--kv-heads", "2", "--head-dim", "16", "--vocab", "256", "--layers", "2",
                     "--seq-len", str(SEQ_LEN), "--prompt-len", "8", "--seqs", str(SEQS), "--micro-tokens", "32",
                     "--steps", "1", "--warmup", "0", "--csv", str(out_csv),
                     "--value-steps", str(VALUE_STEPS), "--value-lr", "1e-3", "--value-check-baseline"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert not dist.is_initialized()  # main took down the world the backend brought up

    rows = {(r["backend"], r["role"], r["precision"], r["phase"]): r for r in csv.DictReader(out_csv.open())}
    expected = {(b, role, p, ph) for role in ("actor", "critic") for ph in ("fwd", "train")
                for b, p in (("megatron", "bf16"), ("megatron", "fp8"), ("torch", "bf16"))}
    assert set(rows) == expected

    for (_backend, role, precision, phase), r in rows.items():
        if precision == "fp8":
            # reported as skipped with the reason, and no number in its place
            assert r["status"].startswith("skipped:") and "CPU" in r["status"], r
            assert all(math.isnan(float(r[k])) for k in ("step_s", "tokens_per_s_per_gpu", "tflops_per_gpu"))
            continue
        assert r["status"] == "ok", r
        tokens, step_s, tps = int(r["tokens_per_step"]), float(r["step_s"]), float(r["tokens_per_s_per_gpu"])
        assert tokens == SEQS * SEQ_LEN
        assert math.isfinite(tps) and tps > 0 and step_s > 0
        assert tps == pytest.approx(tokens / step_s, rel=1e-9)
        # model FLOPs from telemetry/flops.py, counted another way than the script does
        per_token = (forward_flops_per_token if phase == "fwd" else train_flops_per_token)(
            TOY, SEQ_LEN, include_lm_head=role == "actor")
        assert float(r["tflops_per_gpu"]) == pytest.approx(tokens * per_token / step_s / 1e12, rel=1e-9)
        assert math.isnan(float(r["mfu"]))  # no peak on CPU: no MFU rather than a made-up one
        assert r["layers"] == "2" and r["seq_len"] == str(SEQ_LEN)

    # the Markdown table, the skip said once, and only the ratios that were measured
    assert "| megatron | actor | bf16 | train | ok |" in printed
    assert "| torch | critic | bf16 | fwd | ok |" in printed
    assert "| megatron | actor | fp8 | train | skipped | - |" in printed
    assert "NOTE: FP8 rows skipped: FP8 needs a CUDA GPU" in printed
    assert "- fp8/bf16 tokens/s, actor train: not measured (skipped)" in printed
    assert "- megatron/torch tokens/s (bf16), critic train: " in printed
    assert "custom shape (not Qwen3-8B)" in printed

    # critic value regression: FP8 skipped with the reason and no number; bf16 vs bf16 measured
    value_csv = tmp_path / "bench_value.csv"
    assert f"wrote {1 + VALUE_STEPS + 1} value-regression rows to {value_csv}" in printed
    value_rows = list(csv.DictReader(value_csv.open()))
    fp8 = [r for r in value_rows if r["comparison"] == "fp8 vs bf16"]
    assert len(fp8) == 1 and fp8[0]["fp8_recipe"] == "delayed" and fp8[0]["step"] == ""
    assert fp8[0]["status"].startswith("skipped:") and "CPU" in fp8[0]["status"]
    assert all(math.isnan(float(fp8[0][k])) for k in ("ref_mse_to_returns", "cand_mse_to_returns",
                                                       "mse_vs_ref", "max_abs_diff", "rel_rms"))
    assert "- fp8 (hybrid, recipe delayed) vs bf16: skipped: FP8 needs a CUDA GPU" in printed

    base = [r for r in value_rows if r["comparison"] == "bf16 vs bf16"]
    assert [int(r["step"]) for r in base] == list(range(VALUE_STEPS + 1))
    assert all(r["status"] == "ok" and r["candidate"] == "bf16" for r in base)
    stats = [{k: float(r[k]) for k in ("ref_mse_to_returns", "cand_mse_to_returns", "mse_vs_ref",
                                       "max_abs_diff", "rel_rms")} for r in base]
    assert stats[0]["mse_vs_ref"] == 0.0 and stats[0]["max_abs_diff"] == 0.0 and stats[0]["rel_rms"] == 0.0
    assert stats[0]["ref_mse_to_returns"] == stats[0]["cand_mse_to_returns"] > 0
    for st in stats[1:]:
        assert all(math.isfinite(v) and v >= 0 for v in st.values()), st
    # the critics trained: the values moved (the 0/1 returns are not met at init)
    assert stats[-1]["ref_mse_to_returns"] != stats[0]["ref_mse_to_returns"]
    assert "bf16 vs bf16 (baseline check" in printed
    assert "| 0 | " in printed and "value MSE, bf16 (2nd) vs bf16" in printed


def test_bench_train_step_moe_cpu_smoke(tmp_path, megatron_world, capsys):
    """--model qwen3_30b_a3b at a toy shape: both backends run the mixture of experts, FLOPs count the
    active parameters (the router and the top-k experts), and the header says what was reduced."""
    pytest.importorskip("megatron.core")
    from tempo_mega.telemetry.flops import TransformerShape

    bench = load_script()
    out_csv = tmp_path / "bench.csv"
    rc = bench.main(["--device", "cpu", "--model", "qwen3_30b_a3b", "--hidden", "64", "--heads", "4",
                     "--kv-heads", "2", "--head-dim", "16", "--vocab", "256", "--layers", "2", "--experts", "4",
                     "--top-k", "2", "--moe-intermediate", "32", "--seq-len", str(SEQ_LEN), "--prompt-len", "8",
                     "--seqs", str(SEQS), "--micro-tokens", "32", "--steps", "1", "--warmup", "0",
                     "--precision", "bf16", "--value-steps", "0", "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "custom shape (not Qwen3-30B-A3B): 2 layers" in printed
    assert "mixture of experts: 4 experts of 32, top-2" in printed and "dispatcher allgather" in printed
    moe = TransformerShape(hidden_size=64, num_hidden_layers=2, intermediate_size=192, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=256, tie_word_embeddings=False,
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    # 6 N + 12 L H Q T with N = per layer attention + router + 2 experts, and the LM head (by hand)
    n = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 * 4 + 2 * 3 * 64 * 32) + 256 * 64
    assert train_flops_per_token(moe, SEQ_LEN) == 6 * n + 12 * 2 * 4 * 16 * SEQ_LEN
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["backend"], r["role"], r["phase"]) for r in rows} == {
        (b, role, ph) for b in ("megatron", "torch") for role in ("actor", "critic") for ph in ("fwd", "train")}
    for r in rows:
        assert r["status"] == "ok", r
        per_token = (forward_flops_per_token if r["phase"] == "fwd" else train_flops_per_token)(
            moe, SEQ_LEN, include_lm_head=r["role"] == "actor")
        tokens, step_s = int(r["tokens_per_step"]), float(r["step_s"])
        assert float(r["tflops_per_gpu"]) == pytest.approx(tokens * per_token / step_s / 1e12, rel=1e-9)


def test_value_stats_masked():
    """The comparison's numbers on a hand-computed case: padding (mask 0) never counts."""
    bench = load_script()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ref = torch.tensor([[1.0, 2.0, 100.0], [2.0, -50.0, 0.0]])
    cand = torch.tensor([[1.0, 4.0, -100.0], [1.0, 50.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 9.0], [0.0, 9.0, 9.0]])
    s = bench.value_stats(ref, cand, returns, mask)
    assert s["ref_mse_to_returns"] == pytest.approx((0 + 1 + 4) / 3)
    assert s["cand_mse_to_returns"] == pytest.approx((0 + 9 + 1) / 3)
    assert s["mse_vs_ref"] == pytest.approx((0 + 4 + 1) / 3)
    assert s["max_abs_diff"] == 2.0
    assert s["rel_rms"] == pytest.approx(math.sqrt(5 / 3) / math.sqrt((1 + 4 + 4) / 3))
    same = bench.value_stats(ref, ref, returns, mask)
    assert same["mse_vs_ref"] == same["max_abs_diff"] == same["rel_rms"] == 0.0


def test_bench_train_step_reports_errors(megatron_world, capsys):
    """A layout this world cannot hold (TP 2 in a 1-process world) is an error row and exit code 1, not
    a number; the baseline still runs. The value comparison fails the same way, and says so."""
    pytest.importorskip("megatron.core")
    bench = load_script()
    rc = bench.main(["--device", "cpu", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                     "--kv-heads", "2", "--head-dim", "16", "--vocab", "256", "--layers", "2", "--seq-len", "16",
                     "--prompt-len", "4", "--seqs", "1", "--steps", "1", "--warmup", "0", "--tp", "2",
                     "--precision", "bf16", "--roles", "critic",
                     "--value-steps", "1", "--value-check-baseline"])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    assert "- fp8 (hybrid, recipe delayed) vs bf16: skipped: fp8 not in --precision" in printed
    assert "- bf16 vs bf16 (baseline check: the comparison itself and run-to-run noise; not FP8): " \
           "error: " in printed
    assert "(bf16 reference)" in printed
    assert "| megatron | critic | bf16 | fwd | error: " in printed
    assert "| megatron | critic | bf16 | train | not run (fwd: error) |" in printed
    assert "| torch | critic | bf16 | train | ok |" in printed
    assert "- megatron/torch tokens/s (bf16), critic train: not measured (not run (fwd: error))" in printed


def test_peak_from_card_name():
    bench = load_script()
    assert bench.peak_key("NVIDIA H100 80GB HBM3") == "h100_sxm_bf16"
    assert bench.peak_key("NVIDIA H100 PCIe") == "h100_pcie_bf16"
    assert bench.peak_key("NVIDIA H100 NVL") is None  # not in the table: MFU needs --peak
    assert bench.peak_key("NVIDIA H200") == "h200_bf16"
    assert bench.peak_key("NVIDIA A100-SXM4-80GB") == "a100_bf16"
    assert bench.peak_key("NVIDIA GeForce RTX 4090") is None
    cpu = torch.device("cpu")
    assert bench.resolve_peak(None, cpu, "CPU") == (None, "no MFU on CPU")
    assert bench.resolve_peak("h100_sxm_bf16", cpu, "CPU")[0] == 989e12
    assert bench.resolve_peak("500", cpu, "CPU")[0] == 500e12
    with pytest.raises(ValueError, match="--peak"):
        bench.resolve_peak("h100", cpu, "CPU")


def test_default_shape_is_qwen3_8b_layers():
    bench = load_script()
    args = bench.parse_args([])
    cfg = bench.qwen3_config(args)
    assert bench.is_qwen3_8b_layer(cfg) and cfg.num_hidden_layers == bench.DEFAULT_LAYERS < 36
    assert (args.seq_len, args.micro_tokens, args.precision, args.roles) == (16384, 16384, ["bf16", "fp8"],
                                                                             ["actor", "critic"])
    assert (args.value_steps, args.value_fp8_recipes, args.value_check_baseline) == (5, ["delayed"], False)
    assert bench.parse_args(["--fp8-recipe", "tensorwise"]).value_fp8_recipes == ["tensorwise"]
    assert bench.value_csv_path("runs/b.csv") == "runs/b_value.csv"
    with pytest.raises(SystemExit):
        bench.parse_args(["--precision", "fp16"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real benchmark")
def test_no_cuda_says_so(capsys):
    assert load_script().main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_torch_backend_alone_needs_no_megatron_world(tmp_path, capsys):
    """``--backends torch`` (what scripts/gpu_check.sh runs as its own part): torch rows only, no world brought
    up, the Megatron rows and the value comparison not asked for rather than reported skipped."""
    import torch.distributed as dist

    bench = load_script()
    out_csv = tmp_path / "torch.csv"
    rc = bench.main(["--device", "cpu", "--backends", "torch", "--hidden", "64", "--intermediate", "128",
                     "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--vocab", "256", "--layers", "1",
                     "--seq-len", "16", "--prompt-len", "4", "--seqs", "1", "--steps", "1", "--warmup", "0",
                     "--csv", str(out_csv)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert not dist.is_initialized()
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["backend"], r["role"], r["phase"], r["status"]) for r in rows} == {
        ("torch", role, ph, "ok") for role in ("actor", "critic") for ph in ("fwd", "train")}
    assert "megatron/torch" not in printed and "NOTE: Megatron" not in printed
    assert "- bf16 vs bf16" not in printed and "skipped: megatron not in --backends" in printed
    assert bench.parse_args(["--spec", "local"]).spec == "local"
