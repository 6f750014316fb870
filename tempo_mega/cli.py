"""``tempo-mega``: command-line entry points.

    tempo-mega train [hydra overrides...]      e.g. experiment=debug_cpu trainer.total_steps=2
    tempo-mega demo [--out DIR] [overrides...]  warm start -> Stage 1 RLVR -> TEMPO and TTRL, table + plot
    tempo-mega eval --model DIR --bench NAME=FILE -n 16   avg@k / pass@k on benchmark files (strict grading)
    tempo-mega convert hf-to-mcore --hf DIR --out DIR [--tp N --pp M] [--critic] | mcore-to-hf --mcore DIR --out DIR
    tempo-mega doctor                           versions, GPUs, and what each feature is missing
    tempo-mega launch slurm --nodes N ...       write (and --submit) a SLURM script for a run
    tempo-mega report RUN_DIR                   Markdown summary and PNG plots of a run's metrics.jsonl
    tempo-mega selfcheck                        the TEMPO math on a hand-computed case
    tempo-mega plan experiment=NAME --nodes N --gpu h100-80gb   per-GPU memory and an estimated step time
    (prefix -v for INFO logging: tempo-mega -v train ...)
"""

from __future__ import annotations

import logging
import os
import sys

# optional extras (pyproject.toml) by the module that needs them
EXTRAS = {"wandb": "wandb", "sglang": "sglang", "megatron": "megatron", "transformer_engine": "te",
          "triton": "triton", "pynvml": "nvml", "pyarrow": "data", "datasets": "data", "matplotlib": "plot"}


def _train_help() -> str:
    from tempo_mega.config import GROUPS, group_options

    width = max(len(g) for g in GROUPS) + 2
    groups = "\n".join(f"  {g + '=':<{width}}{' | '.join(group_options(g))}" for g in GROUPS if g != "experiment")
    return f"""usage: tempo-mega train [GROUP=CHOICE ...] [KEY=VALUE ...]

Hydra overrides of configs/train.yaml, checked against the dataclasses in tempo_mega/config/ before
anything is built (an unknown key or an impossible value stops the run naming the key).

presets (experiment=NAME):
  {' | '.join(group_options('experiment'))}
config groups:
{groups}
keys: model.*, algo.* (algo.actor.*, algo.critic.*), rollout.* (rollout.sglang.*), data.*, trainer.*,
  kernels.enable, profile.*, precision.*, backend=torch|megatron, megatron.*
run folder: trainer.output_dir=DIR; trainer.resume=auto (default: continue from its last checkpoint,
  else start fresh) | true (continue; an error if there is nothing to continue) | false (a new run; an
  error if DIR holds one); trainer.overwrite=true removes the run in DIR first

examples:
  tempo-mega train experiment=debug_cpu trainer.output_dir=runs/dbg
  tempo-mega train experiment=debug_cpu algo=ttrl trainer.output_dir=runs/ttrl
  tempo-mega train experiment=qwen3_8b_tempo model.path=/ckpt/actor model.critic_path=/ckpt/critic
"""


def _missing_extra(module: str, what: str) -> ValueError:
    return ValueError(f"{what} needs the optional package {module!r}: pip install 'tempo-mega[{EXTRAS[module]}]'")


def _preflight(cfg) -> None:
    """What the run needs from this machine, checked before anything is built: one line each, naming the
    extra to install, instead of a traceback from deep inside the build."""
    import importlib.util

    import torch

    if "wandb" in cfg.trainer.loggers and importlib.util.find_spec("wandb") is None:
        raise _missing_extra("wandb", "trainer.loggers=[...,wandb]")
    sg = cfg.rollout.sglang
    launches = sg.mode == "engine" or (not sg.urls and sg.launch_module == "sglang.launch_server")
    if cfg.rollout.engine == "sglang" and launches and importlib.util.find_spec("sglang") is None:
        raise _missing_extra("sglang", "rollout.engine=sglang (launching the servers here)")
    if cfg.backend == "megatron":
        if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
            raise _missing_extra("megatron", "backend=megatron")
        if not torch.cuda.is_available():
            # megatron-core calls CUDA directly (current_device, CUDA RNG, device="cuda"); the CPU tests
            # redirect those in a test-only shim (tests/support/megatron_cpu.py), which the product never does
            raise ValueError("config key 'backend': backend=megatron needs a CUDA GPU, and this machine has "
                             "none; use backend=torch here (the same losses and checkpoints, one process)")


def _train(overrides: list[str]) -> int:
    from tempo_mega.config import load_config
    from tempo_mega.launch.preemption import Preempted
    from tempo_mega.trainer import run_training

    if any(o in ("-h", "--help") for o in overrides):  # before Hydra, which would parse them as overrides
        print(_train_help())
        return 0
    cfg = load_config(overrides)
    _preflight(cfg)
    try:
        run = run_training(cfg)
    except Preempted as p:
        from tempo_mega.launch.slurm import request_requeue

        code = request_requeue(f"checkpointed after {p.completed_steps} steps")  # the sbatch script's marker
        print(f"preempted: checkpoint after {p.completed_steps} steps in {cfg.trainer.output_dir}/checkpoints; "
              f"rerun with trainer.resume=true (exit code {code} asks SLURM to requeue)")
        return code
    print(f"done: {run.out}/metrics.jsonl, checkpoints in {run.out}/checkpoints, HF export in {run.out}/hf")
    return 0


def _selfcheck() -> int:
    """Run the spec's step-5..7 math on a small case whose answer was computed by hand."""
    import math

    import torch

    from tempo_mega.algo import critic_loss, em_token_advantages, gspo_policy_loss

    values = torch.tensor([[0.5, 0.2, 9.0], [0.1, 0.3, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = em_token_advantages(values, torch.tensor([1.0, -1.0], dtype=torch.float64), mask,
                                   torch.tensor([True, False]))
    std = math.sqrt(0.348 / 4 + 1e-8)
    want = torch.tensor([[0.08, 0.38, 0.0], [0.08, -0.12, -0.42]], dtype=torch.float64) / std
    want[0, 2] = 0.0
    checks = {
        "em_token advantages": torch.allclose(adv, want, atol=1e-12),
        "em_token returns": torch.allclose(ret, torch.tensor([[1.0, 1.0, 0.0], [0.6, 0.6, 0.6]], dtype=torch.float64)),
    }
    v = torch.tensor([[0.3, 0.5]], dtype=torch.float64)
    loss, _ = critic_loss(v, torch.zeros_like(v), torch.ones_like(v), torch.ones(1, 2))
    checks["critic loss (sequence value clip)"] = abs(float(loss) - 0.5 * (1.0 + 0.64) / 2) < 1e-12
    new = torch.tensor([[1e-4, -1e-4, 2e-4, 1e-4]], dtype=torch.float64)
    loss, _ = gspo_policy_loss(new, torch.zeros_like(new), -torch.ones_like(new), torch.ones(1, 4))
    checks["GSPO sequence ratio"] = abs(float(loss) - math.exp(0.75e-4)) < 1e-12
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


COMMANDS = ("train", "demo", "eval", "convert", "report", "doctor", "launch", "selfcheck", "plan")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv[:1])
    if verbose:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tempo-mega: error: unknown command {command!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    # under torchrun: lines say their rank, and only rank 0 says more than warnings
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prefix = f"[rank {rank}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO if verbose and rank == 0 else logging.WARNING,
                        format=prefix + "%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if command == "train":
            return _train(rest)
        if command == "demo":
            from tempo_mega.demo import main as demo_main

            return demo_main(rest)
        if command == "eval":
            from tempo_mega.eval.runner import main as eval_main

            return eval_main(rest)
        if command == "convert":  # pure state-dict conversion: needs no megatron-core at all
            from tempo_mega.backends.megatron.convert_cli import main as convert_main

            return convert_main(rest)
        if command == "doctor":
            from tempo_mega.doctor import main as doctor_main

            return doctor_main(rest)
        if command == "launch":
            if not rest or rest[0] != "slurm":
                print("tempo-mega launch: error: usage: tempo-mega launch slurm [options]", file=sys.stderr)
                return 2
            from tempo_mega.launch.slurm import main as slurm_main

            return slurm_main(rest[1:])
        if command == "plan":
            from tempo_mega.plan import main as plan_main

            return plan_main(rest)
        if command == "report":
            from tempo_mega.report import main as report_main

            return report_main(rest)
        return _selfcheck()
    except (ValueError, FileNotFoundError) as e:  # user mistakes: one clear line, no traceback
        print(f"tempo-mega {command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional extra that is not installed: one line naming it
        top = (getattr(e, "name", None) or "").split(".")[0]
        if top in EXTRAS:
            print(f"tempo-mega {command}: error: {_missing_extra(top, 'this command')}", file=sys.stderr)
        elif "tempo-mega[" in str(e):
            print(f"tempo-mega {command}: error: {e}", file=sys.stderr)
        else:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
