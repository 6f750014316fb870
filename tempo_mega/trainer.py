"""Everything around the EM loop: build the parts from a config, resume, evaluate, log, checkpoint.

``run_training(cfg)`` is what ``tempo-mega train`` runs. The step itself lives in controller.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tempo_mega.backends.torch import TorchBackend
from tempo_mega.build import build_models, build_rollout, resolve_device
from tempo_mega.checkpoint import (
    atomic_checkpoint,
    has_checkpoint,
    list_checkpoints,
    load_json,
    prune_checkpoints,
    quarantine_checkpoint,
    recover_interrupted,
    rng_state,
    save_json,
    set_rng_state,
    verify_checkpoint,
)
from tempo_mega.config import TrainConfig, to_dict
from tempo_mega.controller import TempoController
from tempo_mega.data.pool import PromptPool, load_records, load_tokenizer
from tempo_mega.distributed import any_rank, barrier, broadcast_object, is_rank0, rank
from tempo_mega.eval.in_training import evaluate
from tempo_mega.hostmem import apply_host_memory
from tempo_mega.launch.preemption import Preempted, PreemptionWatch
from tempo_mega.offload import TrainerOffload
from tempo_mega.plan import headline_for_run
from tempo_mega.rollout.hf import HFRolloutEngine
from tempo_mega.telemetry import JsonlSink, MultiSink, PhaseTimer, ProgressSink, WandbSink
from tempo_mega.telemetry.nvml import NvmlSampler
from tempo_mega.telemetry.throughput import profile_step, throughput_metrics
from tempo_mega.warm_start import warm_start

log = logging.getLogger("tempo_mega")

# ---------------------------------------------------------------------- the run
@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    pool: PromptPool
    actor: TorchBackend
    critic: TorchBackend
    rollout: HFRolloutEngine
    ctrl: TempoController
    sink: Any
    start_step: int
    first_line: dict[str, float] | None = None  # metrics that ride on the first step's line


# What a run writes into trainer.output_dir: a folder holding any of these holds a run. Other files (the
# SLURM launcher's tempo.sbatch and logs/, a user's notes) are not the trainer's and are never removed.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "hf", "profile", "wandb")


def _launch_rank() -> int:
    """This process's rank, also before the process group is up (torchrun's RANK)."""
    import os

    import torch.distributed as dist

    return rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def prepare_output_dir(cfg: TrainConfig) -> None:
    """Rank 0, before anything is built: check that trainer.resume / trainer.overwrite agree with what
    trainer.output_dir holds, and remove the old run for trainer.overwrite=true. Raises ValueError naming
    the folder and the ways out."""
    import shutil

    t = cfg.trainer
    out = Path(t.output_dir)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if t.overwrite:
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if held:
            print(f"trainer.overwrite=true: removed the earlier run in {out} ({', '.join(held)})")
        return
    resumable = has_checkpoint(out / "checkpoints")
    if t.resume == "true" and not resumable:
        raise ValueError(f"config key 'trainer.resume': trainer.resume=true, but {out / 'checkpoints'} holds no "
                         "complete checkpoint to resume from; start a run there with trainer.resume=auto (or false)")
    if t.resume == "false" and held:
        raise ValueError(f"config key 'trainer.resume': {out} already holds a run ({', '.join(held)}), and "
                         f"trainer.resume=false starts a new one: continue it with trainer.resume=true, give the new "
                         "run its own trainer.output_dir, or replace the old one with trainer.overwrite=true")
    if t.resume == "auto" and held and not resumable:
        log.warning("trainer.resume=auto: %s holds no complete checkpoint (%s of an attempt that never "
                    "checkpointed): starting fresh", out, ", ".join(held))


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint to resume from, the same on every rank: rank 0 first finishes or removes what a
    crashed save left under ``root`` (``checkpoint.recover_interrupted``), then takes the newest complete
    checkpoint whose files match the checksums in its marker. One that does not is moved aside
    (``checkpoint.quarantine_checkpoint``) with a warning naming the bad file, and the one before it is
    tried; when every one fails, every rank raises ValueError naming the bad file."""
    ckpt, error = None, None
    if is_rank0():
        for action in recover_interrupted(root):
            log.warning("checkpoint recovery in %s: %s", root, action)
        bad = []
        for _, path in reversed(list_checkpoints(root)):
            problem = verify_checkpoint(path)
            if problem is None:
                ckpt = path
                break
            moved = quarantine_checkpoint(path)
            bad.append(problem)
            log.warning("checkpoint %s is corrupt: %s; moved to %s, trying the one before", path.name, problem, moved.name)
        if ckpt is None and bad:
            error = (f"no usable checkpoint in {root}: {'; '.join(bad)} (moved aside as corrupt-*); start fresh "
                     "with trainer.overwrite=true or restore the file")
    ckpt, error = broadcast_object((ckpt, error))
    if error is not None:
        raise ValueError(error)
    return ckpt


def setup(cfg: TrainConfig) -> Run:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t = cfg.trainer
    out = Path(t.output_dir)
    if _launch_rank() == 0:
        prepare_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    apply_host_memory(t.host_memory)  # before the first step's buffers
    device = resolve_device(cfg)
    tokenizer = load_tokenizer(cfg)
    train, test = load_records(cfg)
    pool = PromptPool(cfg, tokenizer, train, test)
    log.info("%s", headline_for_run(cfg, vocab_size=len(tokenizer)))  # `tempo-mega plan` of this run: memory per GPU, step time
    actor, critic = build_models(cfg, tokenizer, device)  # starts the process group of a megatron run
    src = pool.source()
    # trainer.offload_during_rollout: SGLang servers started here size their KV cache against the memory
    # free when they start, so they start with the trainer's state away (servers given by URL are already
    # up; the HF engine copies the actor's weights)
    offload = TrainerOffload(t.offload_during_rollout, (actor, critic))
    if cfg.rollout.engine == "sglang" and not cfg.rollout.sglang.urls:
        offload.offload()
    try:
        rollout = build_rollout(cfg, actor, src.pad_token_id, device)
    finally:
        offload.reload()
    # trainer.resume=false, or overwrite: prepare_output_dir made sure there is nothing to resume
    ckpt = find_resume_checkpoint(out / "checkpoints") if t.resume != "false" and not t.overwrite else None
    # checkpoints and metric lines count completed steps: step_00000003 holds the weights after 3 steps
    done_steps = int(load_json(ckpt / "state.json")["completed_steps"]) if ckpt is not None else 0
    sinks = []
    if not is_rank0():  # rank 0 alone writes the run's files; every rank computes the same metrics
        t = dataclasses.replace(t, loggers=[])
    if "jsonl" in t.loggers:
        sinks.append(JsonlSink(out / "metrics.jsonl", truncate_after_step=done_steps))
    if "progress" in t.loggers:
        sinks.append(ProgressSink(t.total_steps, initial_step=done_steps, desc=f"{out.name} step"))
    if "wandb" in t.loggers:
        # a resumed run continues the wandb run of its checkpoint rather than starting a new one
        wandb_id = load_json(ckpt / "state.json").get("wandb_run_id") if ckpt is not None else None
        sinks.append(WandbSink(t.wandb_project, out.name, to_dict(cfg), out, mode=t.wandb_mode, resume_id=wandb_id))
    sink = MultiSink(sinks)
    if is_rank0():
        save_json(out / "config.json", to_dict(cfg))
    ctrl = TempoController(cfg, actor, critic, rollout, src, PhaseTimer(), offload=offload)
    run = Run(cfg, out, pool, actor, critic, rollout, ctrl, sink, start_step=0)
    if ckpt is not None:
        actor.load(ckpt / "actor")
        critic.load(ckpt / "critic")
        # weights_only: a run folder may be shared or downloaded, and a full unpickle can run code. These
        # files hold tensors, numbers, strings and lists/dicts/tuples only (checkpoint.rng_state).
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        pool.load_state_dict(state["samplers"])
        # rollout.async_steps=1: the next step's samples, sampled before the checkpoint (a resumed run trains
        # on them as the uninterrupted one would); resumed with async_steps=0, that step samples its prompts again
        prefetched = state.get("prefetched")
        if prefetched is not None and not cfg.rollout.async_steps:
            log.warning("the checkpoint holds step %d's prefetched samples (rollout.async_steps=1 before); with "
                        "rollout.async_steps=0 the step samples those prompts again", prefetched["step"])
            prefetched = {**prefetched, "results": None}
        ctrl.load_prefetch_state(prefetched)
        own_rng = ckpt / f"rng_rank{rank()}.pt"
        set_rng_state(torch.load(own_rng, weights_only=True) if rank() > 0 and own_rng.is_file() else state["rng"])
        run.start_step = done_steps
        if is_rank0():
            left = "" if done_steps < t.total_steps else f"; trainer.total_steps={t.total_steps} already reached"
            print(f"resumed from step {done_steps} ({ckpt}){left}")
    else:
        run.first_line = warm_start(cfg, actor, pool)
        if t.warm_start_steps > 0:  # the critic starts from the warmed-up actor, as Stage 1 prescribes
            critic.load_trunk_from(actor)
    ctrl.sync_weights()  # the sampler starts from the trainer's weights (fresh, resumed or warmed up), probed
    return run


def save_checkpoint(run: Run, completed_steps: int) -> Path:
    run.ctrl.offload.reload()  # the state on its devices first (trainer.offload_during_rollout)
    root = run.out / "checkpoints"
    with atomic_checkpoint(root, completed_steps) as d:  # a collective in a multi-process run
        run.actor.save(d / "actor")
        run.critic.save(d / "critic")
        if is_rank0():
            torch.save({"samplers": run.pool.state_dict(), "rng": rng_state(),
                        "prefetched": run.ctrl.prefetch_state()}, d / "trainer_state.pt")
            state: dict[str, Any] = {"completed_steps": completed_steps}
            wandb_sinks = [x for x in getattr(run.sink, "sinks", []) if isinstance(x, WandbSink)]
            if wandb_sinks:
                state["wandb_run_id"] = wandb_sinks[0].run_id
            save_json(d / "state.json", state)
            save_json(d / "config.json", to_dict(run.cfg))
        else:
            torch.save(rng_state(), d / f"rng_rank{rank()}.pt")
    if is_rank0():
        prune_checkpoints(root, run.cfg.trainer.keep_last)
    barrier()
    return root


def export_hf(run: Run, directory: Path) -> None:
    """An HF-loadable actor (with tokenizer) and the critic beside it, for the next stage."""
    run.ctrl.offload.reload()
    run.actor.export_hf(directory / "actor")  # collectives for the Megatron backend; rank 0 writes
    if is_rank0():
        run.pool.tokenizer.save_pretrained(directory / "actor")
    run.critic.export_hf(directory / "critic")



def run_training(cfg: TrainConfig) -> Run:
    run = setup(cfg)
    t = cfg.trainer
    eval_seed = t.seed * 7919 + 1
    initial = dict(run.first_line or {})
    if run.start_step == 0 and t.total_steps > 0:
        # "before" numbers ride on the first step's line, so every line of metrics.jsonl is a step
        initial.update({k.replace("eval/", "eval_initial/", 1): v
                        for k, v in evaluate(run.ctrl, run.pool, cfg, eval_seed).items()})
    for sink in getattr(run.sink, "sinks", []):  # the step bar's clock starts with the first step
        if isinstance(sink, ProgressSink):
            sink.restart_clock()
    gpu = NvmlSampler().start()  # says once and logs nothing where there is no GPU
    with PreemptionWatch(t.preempt_grace_s, run.out / "checkpoints") as watch, gpu:
        for step in range(run.start_step, t.total_steps):
            with profile_step(cfg, run.out, step):
                metrics = run.ctrl.step(step)
            metrics.update(gpu.step_metrics())
            metrics.update(throughput_metrics(run, metrics))
            metrics.update(initial)
            initial = {}
            last = step == t.total_steps - 1
            if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
                metrics.update(evaluate(run.ctrl, run.pool, cfg, eval_seed))
            run.sink.log(metrics, step=step + 1)
            preempted = any_rank(watch.signal is not None)
            if (t.save_every and (step + 1) % t.save_every == 0) or last or preempted:
                save_checkpoint(run, step + 1)
            if any(isinstance(v, float) and math.isnan(v) for k, v in metrics.items() if k.endswith("/loss")):
                raise FloatingPointError(f"step {step}: a loss is NaN; see {run.out / 'metrics.jsonl'}")
            if preempted and not last:
                run.sink.close()
                run.rollout.shutdown()
                raise Preempted(step + 1)
    if t.total_steps > 0:
        export_hf(run, run.out / "hf")
    run.sink.close()
    run.rollout.shutdown()  # servers we launched stop here (and at exit in any case)
    return run
