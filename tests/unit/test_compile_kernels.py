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
    # every autotune config, for both hidden sizes and both entropy flags
    configs = logprob._logprob_fwd_kernel_tuned.configs
    lp = by_kernel["logprob_fwd"]
    assert len(lp) == len(configs) * 2 * 2
    seen = {(j.args[9], j.kwargs["ENTROPY"], j.kwargs["BLOCK_V"], j.kwargs["BLOCK_H"], j.kwargs["num_warps"],
             j.kwargs["num_stages"]) for j in lp}
    assert seen == {(h, e, c.kwargs["BLOCK_V"], c.kwargs["BLOCK_H"], c.num_warps, c.num_stages)
                    for h in (4096, 5120) for e in (False, True) for c in configs}
    assert {j.kwargs["BLOCK_N"] for j in lp} == {logprob._fwd_block_n(16_384)} == {128}
    block_r, block_v, warps = logprob._dlogits_tiles(interp=False)
    for j in by_kernel["logprob_dlogits"]:
        assert (j.kwargs["BLOCK_R"], j.kwargs["BLOCK_V"], j.kwargs["num_warps"]) == (block_r, block_v, warps)
        assert j.args[7] == logprob._chunk_rows(16_384, 151_936)
    assert len(ck.build_jobs(90, quick=True)) == 8  # one per kernel


# ----------------------------------------------------------------------------- the real compile
def _compile(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    out = tmp_path / "compile.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--csv", str(out), *args], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    rows = list(csv.DictReader(out.open())) if out.exists() else []
    return res, rows


# The log-prob forward's autotune list holds configs that spill at BLOCK_N=128 with this Triton (on sm_90:
# all but (BLOCK_V, BLOCK_H, warps, stages) = (128, 64, 8, 3) and, without entropy, (64, 64, 4, 4) and
# (256, 64, 8, 3); docs/benchmarks.md). The script reports them and exits 1; until the list is pruned (a
# kernel change, not this script's), the test admits spills there and nowhere else.
MAY_SPILL = {"logprob_fwd"}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    """The full sm_90 set (32 compiles, about 60 s on 2 cores): each compiles, none exceeds the shared
    memory limit, none but the log-prob forward's known configs spills; the exit status says so."""
    res, rows = _compile(tmp_path, "--targets", "90")
    printed = res.stdout + res.stderr
    assert len(rows) == len(ck.build_jobs(90)) == 32, printed[-3000:]
    assert {r["target"] for r in rows} == {"sm_90"}
    for r in rows:
        assert "compile error" not in r["status"] and "no register" not in r["status"], r
        assert int(r["shared"]) <= ck.SMEM_LIMIT[90], r
        assert 0 < int(r["n_regs"]) <= 255 and r["num_warps"] in {"4", "8"}, r
        if r["kernel"] not in MAY_SPILL:
            assert r["status"] == "ok" and r["n_spills"] == "0" and r["spill_bytes"] == "0", r
    failed = [r for r in rows if r["status"] != "ok"]
    assert res.returncode == (1 if failed else 0), printed[-3000:]
    assert "| kernel" in res.stdout and "n_regs" in res.stdout
    # the config the forward's autotuner is given first never spills
    first = [r for r in rows if r["kernel"] == "logprob_fwd" and "BLOCK_V=128 BLOCK_H=64 num_warps=8" in r["config"]]
    assert len(first) == 4 and all(r["status"] == "ok" for r in first), first


def test_quick_compile_all_targets(tmp_path):
    """--quick: one config per kernel for sm_90, sm_80 and sm_100 (about 15 s on 2 cores), all clean."""
    res, rows = _compile(tmp_path, "--quick", "--jobs", "2")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert {r["target"] for r in rows} == {"sm_90", "sm_80", "sm_100"} and len(rows) == 24
    assert all(r["status"] == "ok" for r in rows)
