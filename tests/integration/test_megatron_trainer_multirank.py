"""The whole trainer as a real multi-process run: ``tempo-mega train`` under torchrun with 2 ranks,
backend=megatron with PP=2 (one layer per stage, tied embeddings across the stages), on CPU/gloo.

Two steps, a checkpoint, then a resumed run to step 3 give the losses of the one-process torch backend
on the same config; rank 0 alone writes the metrics, and the checkpoint directory is published once
with every rank's shards in it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # tests/megatron_cpu_support.py

COMMON = ["experiment=debug_cpu", "trainer.save_every=1", "trainer.keep_last=2"]
MEGATRON = ["backend=megatron", "megatron.pipeline_parallel_size=2"]


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_world(overrides: list[str], timeout_s: int = 400) -> None:
    from megatron_cpu_support import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(HERE), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_rank_pipeline_run_trains_like_torch_and_resumes(tmp_path):
    from tempo_mega.config import load_config
    from tempo_mega.trainer import run_training

    ref_out = tmp_path / "torch"
    run_training(load_config([*COMMON, "trainer.total_steps=3", f"trainer.output_dir={ref_out}"]))
    out = tmp_path / "megatron_pp2"
    run_world([*COMMON, *MEGATRON, "trainer.total_steps=2", f"trainer.output_dir={out}"])
    assert [x["step"] for x in lines(out)] == [1, 2]  # one writer: no line twice
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]  # no .tmp-* left
    step2 = ckpts / "step_00000002"
    assert (step2 / "COMPLETE").exists() and (step2 / "trainer_state.pt").exists()
    assert (step2 / "rng_rank1.pt").exists()
    assert (out / "hf" / "actor" / "config.json").exists() and (out / "hf" / "critic").is_dir()

    run_world([*COMMON, *MEGATRON, "trainer.total_steps=3", f"trainer.output_dir={out}", "trainer.resume=true"])
    meg, ref = lines(out), lines(ref_out)
    assert [x["step"] for x in meg] == [1, 2, 3]
    for step in range(3):
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "rollout/score_mean"):
            assert meg[step][key] == pytest.approx(ref[step][key], abs=1e-4), (step + 1, key)


if __name__ == "__main__":  # one rank of the torchrun world
    from megatron_cpu_support import megatron_on_cpu

    from tempo_mega.config import load_config
    from tempo_mega.trainer import run_training

    with megatron_on_cpu():
        run_training(load_config(sys.argv[1:]))
        import torch.distributed as dist
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
