"""Per-step throughput around the controller's timings: the torch profiler on chosen steps, MFU per
phase and tokens per GPU-second and per joule over the devices the step ran on."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tempo_mega.algo.recipes import recipe
from tempo_mega.config import TrainConfig
from tempo_mega.telemetry.flops import phase_mfu
from tempo_mega.telemetry.nvml import tokens_per_joule

if TYPE_CHECKING:
    from tempo_mega.trainer import Run


def profile_step(cfg: TrainConfig, out: Path, step: int):
    """A torch profiler around the steps listed in profile.steps (a Chrome trace per step; NVTX ranges
    around the phases come from PhaseTimer, for nsys)."""

    if step not in cfg.profile.steps:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trace_dir = Path(cfg.profile.dir) if cfg.profile.dir else out / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def export(prof) -> None:
        prof.export_chrome_trace(str(trace_dir / f"step_{step:06d}.json"))

    @contextlib.contextmanager
    def ctx():
        with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            yield
        export(prof)

    return ctx()


def trainer_num_gpus(run: Run) -> int:
    """The devices a step's phases ran on, which MFU and per-GPU throughput divide by: every rank of a
    backend=megatron world (one device per rank; actor and critic share megatron's one parallel state,
    and the rollout runs on those devices too, colocated or from rank 0 while the others wait), 1 for
    the torch backend (one process, one device). The step's token count is the whole batch's, which
    every megatron rank is given."""
    import torch.distributed as dist

    if run.cfg.backend == "megatron" and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _energy_of_all_ranks(run: Run, m: dict[str, float]) -> float | None:
    """``gpu/energy_j`` summed over the ranks (each samples its own GPU), or None unless every rank
    measured it. A collective in a multi-rank world: every rank calls it at the same point."""
    import torch.distributed as dist

    measured = "gpu/energy_j" in m
    if trainer_num_gpus(run) == 1:
        return float(m["gpu/energy_j"]) if measured else None
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(m["gpu/energy_j"]) if measured else 0.0, float(measured)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t[0]) if int(t[1]) == dist.get_world_size() else None


def throughput_metrics(run: Run, m: dict[str, float], *, on_gpu: bool | None = None) -> dict[str, float]:
    """Tokens per joule where NVML measured the energy of every rank's GPU (the step's tokens over all
    of it); MFU per phase and tokens/s per GPU over ``trainer_num_gpus`` where the step ran on GPUs
    (``on_gpu`` None: the actor's device is CUDA; the CPU has no peak to compare with, so tests pass
    True to check the arithmetic there)."""
    out = {}
    energy_j = _energy_of_all_ranks(run, m)
    if energy_j is not None and "perf/num_tokens" in m:
        out["perf/tokens_per_joule"] = tokens_per_joule(m["perf/num_tokens"], energy_j)
    if on_gpu is None:
        on_gpu = run.actor.device.type == "cuda"
    if on_gpu and "timing/step_s" in m:
        a = run.cfg.algo
        # MegatronBackend keeps the HF config beside its megatron model
        actor_cfg = getattr(run.actor, "hf_config", None) or run.actor.model.config
        critic_cfg = getattr(run.critic, "hf_config", None) or run.critic.model.config
        out.update(phase_mfu(m, actor_cfg, critic_cfg, trainer_num_gpus(run), run.cfg.trainer.gpu_peak,
                             actor_epochs=a.actor.epochs, critic_epochs=a.critic.epochs,
                             critic_labeled_only=recipe(a.mode).critic_rows == "labeled"))
    return out
