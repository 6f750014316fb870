"""The whole trainer as a real multi-process run: ``tempo-mega train`` under torchrun with 2 ranks,
backend=megatron with PP=2 (one layer per stage, tied embeddings across the stages), on CPU/gloo.

Two steps, a checkpoint, then a resumed run to step 3 give the losses of the one-process torch backend
on the same config; rank 0 alone writes the metrics, and the checkpoint directory is published once
with every rank's shards in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.runs import read_metrics

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve()

COMMON = ["experiment=debug_cpu", "trainer.save_every=1", "trainer.keep_last=2"]
MEGATRON = ["backend=megatron", "megatron.pipeline_parallel_size=2"]




def run_world(overrides: list[str], timeout_s: int = 400, perf_out: Path | None = None) -> None:
    """``perf_out``: each rank also writes what ``throughput_metrics`` makes of a step's metrics there."""
    from support.net import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(HERE), *overrides]
    env = {**os.environ, **({"TEMPO_TEST_PERF_OUT": str(perf_out)} if perf_out is not None else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parents[2], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_rank_pipeline_run_trains_like_torch_and_resumes(tmp_path):
    from tempo_mega.config import load_config
    from tempo_mega.trainer import run_training

    ref_out = tmp_path / "torch"
    run_training(load_config([*COMMON, "trainer.total_steps=3", f"trainer.output_dir={ref_out}"]))
    out = tmp_path / "megatron_pp2"
    run_world([*COMMON, *MEGATRON, "trainer.total_steps=2", f"trainer.output_dir={out}"])
    assert [x["step"] for x in read_metrics(out)] == [1, 2]  # one writer: no line twice
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]  # no .tmp-* left
    step2 = ckpts / "step_00000002"
    assert (step2 / "COMPLETE").exists() and (step2 / "trainer_state.pt").exists()
    assert (step2 / "rng_rank1.pt").exists()
    assert (out / "hf" / "actor" / "config.json").exists() and (out / "hf" / "critic").is_dir()

    resumed = [*COMMON, *MEGATRON, "trainer.total_steps=3", f"trainer.output_dir={out}", "trainer.resume=true"]
    run_world(resumed, perf_out=tmp_path / "perf")
    meg, ref = read_metrics(out), read_metrics(ref_out)
    assert [x["step"] for x in meg] == [1, 2, 3]
    for step in range(3):
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "rollout/score_mean"):
            assert meg[step][key] == pytest.approx(ref[step][key], abs=1e-4), (step + 1, key)
    _check_per_gpu_metrics(tmp_path / "perf", load_config(resumed))


# a step's metrics, as the controller and the NVML sampler report them (rank r's GPU used 100 + r J)
STEP_METRICS = {"timing/step_s": 4.0, "timing/logprob_s": 0.5, "timing/e_step_s": 1.0, "timing/m_step_s": 1.5,
                "timing/rollout_s": 1.0, "perf/tokens_per_s": 600.0, "perf/num_tokens": 2400.0,
                "rollout/num_samples": 16.0, "rollout/response_len_mean": 20.0, "rollout/labeled_frac": 0.5,
                "rollout/gen_batches": 1.0}


def _check_per_gpu_metrics(perf: Path, cfg) -> None:
    """MFU and tokens/s per GPU count both GPUs of the 2-rank world: half of what one GPU doing the step's
    work would have; tokens per joule count the energy of both GPUs."""
    from tempo_mega.algo.recipes import recipe
    from tempo_mega.telemetry.flops import phase_mfu

    got = [torch.load(perf / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert got[0]["num_gpus"] == got[1]["num_gpus"] == 2
    shape = got[0]["hf_config"]
    one_gpu = phase_mfu(STEP_METRICS, shape, shape, 1, cfg.trainer.gpu_peak, actor_epochs=cfg.algo.actor.epochs,
                        critic_epochs=cfg.algo.critic.epochs, critic_labeled_only=recipe(cfg.algo.mode).critic_rows == "labeled")
    for g in got:
        out = g["perf"]
        assert {k for k in one_gpu if k.startswith("perf/mfu")} == {k for k in out if k.startswith("perf/mfu")}
        assert "perf/mfu_m_step" in out and "perf/mfu_rollout" in out
        for key, value in one_gpu.items():
            assert out[key] == pytest.approx(value / 2, rel=1e-12), key
        assert out["perf/tokens_per_s_per_gpu"] == STEP_METRICS["perf/tokens_per_s"] / 2
        assert out["perf/tokens_per_joule"] == pytest.approx(STEP_METRICS["perf/num_tokens"] / (100.0 + 101.0))


if __name__ == "__main__":  # one rank of the torchrun world
    from support.megatron_cpu import megatron_on_cpu

    from tempo_mega.config import load_config
    from tempo_mega.trainer import run_training

    with megatron_on_cpu():
        run = run_training(load_config(sys.argv[1:]))
        import torch.distributed as dist
        from megatron.core import parallel_state

        if os.environ.get("TEMPO_TEST_PERF_OUT"):  # the per-GPU arithmetic on this world, as on CUDA
            from tempo_mega.telemetry.throughput import throughput_metrics, trainer_num_gpus

            me = dist.get_rank()
            step = {**STEP_METRICS, "gpu/energy_j": 100.0 + me}
            perf = Path(os.environ["TEMPO_TEST_PERF_OUT"])
            perf.mkdir(parents=True, exist_ok=True)
            torch.save({"num_gpus": trainer_num_gpus(run), "perf": throughput_metrics(run, step, on_gpu=True),
                        "hf_config": run.actor.hf_config.to_dict()}, perf / f"rank{me}.pt")

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
