"""scripts/compile_kernels.py: every Triton kernel compiles ahead of time for sm_90 on this CPU (Triton's own
pipeline and the wheel's ptxas, no driver), the jobs follow the wrappers' block-size helpers, and the
checks reject a spill, shared memory over a target's limit and a compile error.

The compile runs in a subprocess: this suite sets TRITON_INTERPRET=1 (tests/conftest.py), under which the
kernel modules define interpreted kernels."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "compile_kernels.py"

pytest.importorskip("triton")
_spec = importlib.util.spec_from_file_location("compile_kernels", SCRIPT)
ck = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("compile_kernels", ck)  # dataclasses look their module up there
_spec.loader.exec_module(ck)

PTXAS_LOG = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_logprob_fwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _logprob_fwd_kernel
    416 bytes stack frame, 432 bytes spill stores, 420 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 416 bytes cumulative stack size
"""


def _ok(target=90, **kw) -> ck.Result:
    fields = {"n_regs": 64, "n_spills": 0, "spill_bytes": 0, "shared": 1024, "num_warps": 4, "num_stages": 3}
    return ck.Result("k", "v", "c", target, **{**fields, **kw})


# ----------------------------------------------------------------------------- the checks (pure)
def test_a_clean_result_passes():
    assert ck.problems(_ok()) == []


def test_spills_are_rejected():
    assert any("spill" in p for p in ck.problems(_ok(n_spills=2)))
    assert any("spill" in p for p in ck.problems(_ok(spill_bytes=16)))  # ptxas spill bytes alone count too


@pytest.mark.parametrize("target, limit", [(80, 166_912), (90, 232_448), (100, 232_448)])
def test_shared_memory_limit_per_target(target, limit):
    assert ck.problems(_ok(target, shared=limit)) == []
    bad = ck.problems(_ok(target, shared=limit + 1))
    assert len(bad) == 1 and "shared memory" in bad[0] and str(limit) in bad[0]


def test_sm80_limit_is_below_hopper():
    assert ck.problems(_ok(80, shared=200_000)) and not ck.problems(_ok(90, shared=200_000))


def test_compile_error_and_missing_figures_are_rejected():
    err = ck.Result("k", "v", "c", 90, error="PTXASError: boom")
    assert ck.problems(err) == ["compile error: PTXASError: boom"]
    assert ck.problems(_ok(n_regs=None))
    assert ck.problems(_ok(target=75))  # no known limit: not silently passed


def test_parse_ptxas_log():
    assert ck.parse_ptxas_log(PTXAS_LOG) == (255, 416, 852)
    assert ck.parse_ptxas_log("nothing here") == (None, None, None)


def test_failing_result_fails_main_status(monkeypatch, capsys):
    # main() sets TRITON_INTERPRET=0 for its own process; monkeypatch puts this suite's value back after
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setattr(ck, "run", lambda targets, quick, jobs: [_ok(), _ok(n_spills=1)])
    assert ck.main(["--targets", "90", "--jobs", "1"]) == 1
    assert "FAIL k" in capsys.readouterr().err
    monkeypatch.setattr(ck, "run", lambda targets, quick, jobs: [_ok(), _ok(shared=100)])
    assert ck.main(["--targets", "90", "--jobs", "1"]) == 0


def test_bad_targets_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    with pytest.raises(SystemExit):
        ck.main(["--targets", "75"])
    with pytest.raises(SystemExit):
        ck.main(["--targets", "sm90x"])


# ----------------------------------------------------------------------------- the jobs follow the wrappers
def test_jobs_use_the_wrappers_helpers():
    from tempo_mega.kernels import logprob, seq_losses, value_head

    jobs = ck.build_jobs(90)
    by_kernel: dict[str, list] = {}
    for j in jobs:
        by_kernel.setdefault(j.kernel, []).append(j)
    assert set(by_kernel) == {"value_head_fwd", "value_head_bwd", "gspo_fwd", "gspo_bwd", "value_loss_fwd",
                              "value_loss_bwd", "logprob_fwd", "logprob_dlogits"}
    bn, bh, warps = value_head._fwd_blocks(5120)
    assert (by_kernel["value_head_fwd"][0].kwargs["BLOCK_N"], by_kernel["value_head_fwd"][0].kwargs["BLOCK_H"],
            by_kernel["value_head_fwd"][0].kwargs["num_warps"]) == (bn, bh, warps)
    bn, bh, groups, _ = value_head._bwd_blocks_for(131_072, 5120, 4 * 132)
    assert by_kernel["value_head_bwd"][0].args[-1] == groups and by_kernel["value_head_bwd"][0].kwargs["BLOCK_H"] == bh
    import torch

    for k in ("gspo_fwd", "gspo_bwd", "value_loss_fwd", "value_loss_bwd"):
        assert by_kernel[k][0].kwargs["BLOCK"] == seq_losses._block(torch.device("cuda")) == 1024
    # every autotune config, for both hidden sizes and both entropy flags (sm_90 keeps them all)
    configs = logprob._logprob_fwd_kernel_tuned.configs
    assert [(c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages) for c in configs] == list(
        logprob._FWD_TILES)
    lp = by_kernel["logprob_fwd"]
    assert len(lp) == len(configs) * 2 * 2
    seen = {(j.args[9], j.kwargs["ENTROPY"], j.kwargs["BLOCK_V"], j.kwargs["BLOCK_H"], j.kwargs["num_warps"],
             j.kwargs["num_stages"]) for j in lp}
    assert seen == {(h, e, c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages)
                    for h in (4096, 5120) for e in (False, True) for c in configs}
    # sm_80 drops the configs that spill there, and only with entropy: exactly what its autotuner prunes
    lp80 = [j for j in ck.build_jobs(80) if j.kernel == "logprob_fwd"]
    kept = {e: {(j.kwargs["BLOCK_V"], j.kwargs["BLOCK_H"]) for j in lp80 if j.kwargs["ENTROPY"] == e}
            for e in (False, True)}
    assert kept[False] == {t[:2] for t in logprob._FWD_TILES}
    assert kept[True] == {t[:2] for t in logprob._FWD_TILES} - {(128, 64)}
    assert len(lp80) == 2 * (len(configs) + len(logprob._fwd_configs_for(configs, 8, True)))
    assert {j.kwargs["BLOCK_N"] for j in lp} == {logprob._fwd_block_n(16_384)} == {128}
    block_r, block_v, warps = logprob._dlogits_tiles(interp=False)
    for j in by_kernel["logprob_dlogits"]:
        assert (j.kwargs["BLOCK_R"], j.kwargs["BLOCK_V"], j.kwargs["num_warps"]) == (block_r, block_v, warps)
        assert j.args[7] == logprob._chunk_rows(16_384, 151_936)
    assert len(ck.build_jobs(90, quick=True)) == 8  # one per kernel


def test_forward_autotuner_prunes_by_the_gpu_it_runs_on(monkeypatch):
    """The autotuner's own prune hook, on a tensor of a (faked) sm_80 and sm_90 device: it calls the helper
    that scripts/compile_kernels.py compiles per target, so the configs checked are the configs run."""
    import torch
    from tempo_mega.kernels import logprob

    tuner = logprob._logprob_fwd_kernel_tuned
    prune = tuner.early_config_prune
    h = torch.empty(1)

    def tiles(cs):
        return [(c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages) for c in cs]

    for major, entropy, dropped in [(9, True, set()), (9, False, set()), (10, True, set()), (8, False, set()),
                                    (8, True, {(128, 64, 8, 3), (128, 64, 8, 4)})]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        kept = tiles(prune(tuner.configs, {"h_ptr": h}, BLOCK_N=128, UPCAST=False, ENTROPY=entropy))
        assert set(kept) == set(logprob._FWD_TILES) - dropped and kept, (major, entropy, kept)


# ----------------------------------------------------------------------------- the real compile
def _compile(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    out = tmp_path / "compile.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--csv", str(out), *args], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    return res, rows


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    """The full sm_90 set (28 compiles, about 30 s on 2 cores): each compiles, none spills, none exceeds
    the shared memory limit, and the exit status is 0."""
    res, rows = _compile(tmp_path, "--targets", "90")
    printed = res.stdout + res.stderr
    assert len(rows) == len(ck.build_jobs(90)) == 28, printed[-3000:]
    assert {r["target"] for r in rows} == {"sm_90"}
    for r in rows:
        assert r["status"] == "ok" and r["n_spills"] == "0" and r["spill_bytes"] == "0", r
        assert int(r["shared"]) <= ck.SMEM_LIMIT[90], r
        assert 0 < int(r["n_regs"]) <= 255 and r["num_warps"] in {"4", "8"}, r
    assert res.returncode == 0, printed[-3000:]
    assert "| kernel" in res.stdout and "n_regs" in res.stdout


@pytest.mark.slow
def test_quick_compile_all_targets(tmp_path):
    """--quick: one config per kernel for sm_90, sm_80 and sm_100 (about 15 s on 2 cores), all clean."""
    res, rows = _compile(tmp_path, "--quick", "--jobs", "2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert {r["target"] for r in rows} == {"sm_90", "sm_80", "sm_100"} and len(rows) == 24
    assert all(r["status"] == "ok" for r in rows)
