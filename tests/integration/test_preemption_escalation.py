"""A run told to stop (SIGTERM / SIGUSR1) finishes its step and checkpoints, but never waits forever:
a second signal, or trainer.preempt_grace_s after the first, ends it at once with a non-zero code and a
message naming the last complete checkpoint, which stays intact. The child here hangs the way the
megatron save did (a JoinableQueue whose worker never marks its task done), in the middle of writing
the next checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CHILD = textwrap.dedent("""
    import multiprocessing as mp, sys
    from pathlib import Path
    from tempo_mega.checkpoint import atomic_checkpoint, save_json
    from tempo_mega.launch.preemption import PreemptionWatch

    root, grace = Path(sys.argv[1]), float(sys.argv[2])
    with atomic_checkpoint(root, 1) as d:
        save_json(d / "state.json", {"completed_steps": 1})
    with PreemptionWatch(grace, root):
        with atomic_checkpoint(root, 2) as d:  # the save that never ends
            save_json(d / "state.json", {"completed_steps": 2})
            q = mp.get_context("fork").JoinableQueue()
            q.put(0)
            print("READY", flush=True)
            q.join()
    print("UNREACHABLE", flush=True)
""")


def _start(tmp_path: Path, grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "checkpoints"), str(grace_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    return proc


def _finish(proc: subprocess.Popen, within_s: float) -> tuple[str, str, float]:
    start = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the process did not end within {within_s} s: {stderr[-2000:]}")
    return stdout, stderr, time.monotonic() - start


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_ends_a_hung_run_at_once(tmp_path, second):
    from tempo_mega.checkpoint import latest_checkpoint
    from tempo_mega.launch.preemption import PreemptionWatch

    proc = _start(tmp_path, grace_s=600.0)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # one request delivered twice (SLURM and torchrun both forward it)
    time.sleep(PreemptionWatch.REPEAT_WINDOW_S + 1.0)
    assert proc.poll() is None  # the first signal only asks for a checkpoint after the step
    proc.send_signal(second)
    stdout, stderr, took = _finish(proc, within_s=30)
    assert proc.returncode == 128 + second, stderr[-2000:]
    assert took < 15, took
    assert "UNREACHABLE" not in stdout
    last = tmp_path / "checkpoints" / "step_00000001"
    assert "ending the run now: a second signal" in stderr and str(last) in stderr, stderr[-2000:]
    assert latest_checkpoint(tmp_path / "checkpoints") == last  # the last complete one, intact


def test_grace_period_ends_a_hung_run(tmp_path):
    from tempo_mega.checkpoint import latest_checkpoint

    proc = _start(tmp_path, grace_s=2.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr, _ = _finish(proc, within_s=30)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert 2.0 <= took < 20, took
    assert "ending the run now: trainer.preempt_grace_s=2 s passed" in stderr, stderr[-2000:]
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_00000001"


def test_grace_must_be_positive():
    from tempo_mega.config import load_config

    with pytest.raises(ValueError, match="trainer.preempt_grace_s"):
        load_config(["trainer.preempt_grace_s=0"])
