"""``tempo-mega launch slurm``: render an sbatch script for a TEMPO run, write it, optionally submit it.

    tempo-mega launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --container-image /shared/containers/tempo-mega.sqsh --output-dir /shared/runs/qwen3-8b \\
        experiment=qwen3_8b_tempo model.path=/shared/models/actor model.critic_path=/shared/models/critic
    # writes /shared/runs/qwen3-8b/tempo.sbatch (and logs/); add --submit to run sbatch, --print to only print

The script runs one ``torchrun`` per training node under ``srun`` (inside a Pyxis/enroot container with
``--container-image``, or in a plain environment with ``--venv``), rendezvous from SLURM's variables.

Preemption and time limits (the requeue contract):

- SLURM sends SIGUSR1 to the batch script ``--signal-lead-s`` seconds before the time limit
  (``#SBATCH --signal=B:USR1@N``; SLURM may send it up to 60 s early). The script's trap forwards
  SIGUSR1 (and SIGTERM, which SLURM sends on preemption or cancellation) to the ``srun`` step, which
  hands it to ``torchrun``; ``torchrun --signals-to-handle ...,SIGUSR1`` passes it to every rank and
  waits ``--shutdown-timeout`` seconds before killing them.
- A trainer that has written a checkpoint and wants the job to go on exits with
  ``REQUEUE_EXIT_CODE`` (85) and writes the file ``$TEMPO_REQUEUE_MARKER`` (``<output-dir>/REQUEUE_REQUESTED``;
  both are exported to the ranks): ``sys.exit(request_requeue())`` does both. The marker is what
  reaches the script: torchrun exits 1 whatever its ranks' exit codes were. The script then runs ``scontrol requeue $SLURM_JOB_ID`` (at most
  ``--max-requeues`` times, counted by ``SLURM_RESTART_COUNT``).
- Every run of the script passes ``trainer.output_dir=<output-dir> trainer.resume=auto``, so the
  requeued job (same job id, same script, same log file: ``--open-mode=append``) resumes from the
  latest complete checkpoint, and a first run with no checkpoint starts from step 0.

Before it renders, ``main`` composes and validates the run's config as ``tempo-mega train`` would and
checks that the parallel layout fits the training ranks (``check_run_config``); ``--force`` renders anyway.

85 is free in every layer the exit code crosses: bash uses 126, 127 and 128+N, ``timeout`` 124,
sysexits 64-78, SLURM's srun 253 (out of memory), torchrun 1.

SGLang placement: ``colocated`` (default) leaves the engines to the trainer, on the training GPUs.
``separate`` runs one ``python -m sglang.launch_server`` per node on the last ``--sglang-nodes``
nodes (TP x DP = GPUs per node), records the pids of their ``srun`` steps, waits for ``/health``,
passes their URLs to the trainer as ``<--sglang-urls-key>=[http://host:port,...]`` and stops them
with ``kill <pid>`` when the script exits. Each server binds its node's cluster address and wants a key made
for the job (``--api-key``), which the trainer sends from ``$TEMPO_SGLANG_API_KEY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tempo_mega.launch.sbatch import render_sbatch
from tempo_mega.launch.slurm_job import (
    PLACEMENTS,
    REQUEUE_EXIT_CODE,
    REQUEUE_MARKER_NAME,
    SlurmJob,
    check_run_config,
    request_requeue,
    sglang_server_flags,
)

__all__ = [
    "REQUEUE_EXIT_CODE",
    "REQUEUE_MARKER_NAME",
    "SlurmJob",
    "main",
    "request_requeue",
    "render_sbatch",
]

SCRIPT_NAME = "tempo.sbatch"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tempo-mega launch slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SlurmJob(nodes=1, output_dir="")
    p.add_argument("--nodes", type=int, required=True, help="nodes in the allocation (training + SGLang)")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", dest="time_limit", default=d.time_limit, help="SLURM time limit, e.g. 24:00:00")
    p.add_argument("--job-name", default=d.job_name)
    p.add_argument("--output-dir", required=True,
                   help="shared directory for the script, logs/ and the trainer's output (made absolute)")
    env = p.add_mutually_exclusive_group()
    env.add_argument("--container-image", default=None,
                     help="Pyxis/enroot image: a docker URI such as nvcr.io#nvidia/pytorch:26.09-py3 or a .sqsh path")
    env.add_argument("--venv", default=None, help="virtual environment to activate instead of a container")
    p.add_argument("--container-mount", action="append", default=[], metavar="SRC:DST[:FLAGS]",
                   help="extra bind mount (repeatable); the output dir is always mounted at the same path")
    p.add_argument("--container-workdir", default=None)
    p.add_argument("--signal-lead-s", type=int, default=d.signal_lead_s,
                   help="send SIGUSR1 this many seconds before the time limit (default %(default)s)")
    p.add_argument("--shutdown-timeout-s", type=int, default=None,
                   help="torchrun's wait for the ranks after a signal (default: signal lead - 30 s, >= 30)")
    p.add_argument("--max-requeues", type=int, default=d.max_requeues)
    p.add_argument("--sglang-placement", choices=PLACEMENTS, default=None,
                   help="default: the run's rollout.placement (colocated)")
    p.add_argument("--sglang-nodes", type=int, default=None,
                   help="with separate placement: nodes that run SGLang (default: the run's rollout.rollout_nodes)")
    p.add_argument("--sglang-tp", type=int, default=None, help="tensor parallel size per server (default: all GPUs)")
    p.add_argument("--sglang-port", type=int, default=d.sglang_port)
    p.add_argument("--sglang-model", default=None, help="model the servers load (default: the model.path override)")
    p.add_argument("--sglang-urls-key", default=d.sglang_urls_key,
                   help="override that receives the server URLs (default %(default)s)")
    p.add_argument("--sglang-ready-timeout-s", type=int, default=d.sglang_ready_timeout_s)
    p.add_argument("--sglang-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for sglang.launch_server, e.g. --sglang-arg=--mem-fraction-static=0.8")
    p.add_argument("--nccl-socket-ifname", default=d.nccl_socket_ifname)
    p.add_argument("--nccl-ib-hca", default=d.nccl_ib_hca)
    p.add_argument("--exclusive", action="store_true", help="ask for whole nodes (#SBATCH --exclusive)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--mem=0 (repeatable)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the script; write nothing")
    p.add_argument("--submit", action="store_true", help="run sbatch on the written script")
    p.add_argument("--force", action="store_true",
                   help="render even when the run's config does not compose or its layout does not fit the nodes")
    p.add_argument("overrides", nargs="*", help="tempo-mega train overrides (Hydra), e.g. experiment=qwen3_8b_tempo")
    return p


def _rollout_config(overrides):
    """The run's ``rollout`` config, or None where the overrides do not compose (check_run_config then
    says what is wrong)."""
    from tempo_mega.config import load_config

    try:
        return load_config(list(overrides)).rollout
    except ValueError:
        return None


def _placement(args) -> tuple[str, int, tuple[str, ...]]:
    """SGLang's placement and nodes: the flags where given (the run's overrides then say the same:
    rollout.placement, rollout.rollout_nodes, and weight_sync=distributed where the config had tensor
    sync, which reaches no other node), else the run's config (a preset may name them)."""
    overrides = tuple(args.overrides)
    if args.sglang_placement is None and args.sglang_nodes is None:
        r = _rollout_config(overrides)
        return (r.placement, r.rollout_nodes, overrides) if r is not None else ("colocated", 0, overrides)
    placement = args.sglang_placement or ("separate" if args.sglang_nodes else "colocated")
    nodes = args.sglang_nodes or 0
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    extra = tuple(o for key, o in (("rollout.placement", f"rollout.placement={placement}"),
                                   ("rollout.rollout_nodes", f"rollout.rollout_nodes={nodes}")) if key not in given)
    if placement == "separate" and "rollout.sglang.weight_sync" not in given:
        # CUDA IPC (tensor sync, the colocated presets' choice) does not reach other nodes: NCCL does. Read
        # with the placement left neutral: what depends on it is checked with the job's own, later
        r = _rollout_config([*overrides, "rollout.placement=colocated", "rollout.rollout_nodes=0",
                             "rollout.async_steps=0"])
        if r is not None and r.sglang.weight_sync == "tensor":
            extra += ("rollout.sglang.weight_sync=distributed",)
    return placement, nodes, overrides + extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    out = Path(args.output_dir).expanduser()
    out = out if out.is_absolute() else Path.cwd() / out
    placement, sglang_nodes, overrides = _placement(args)
    job = SlurmJob(
        nodes=args.nodes, output_dir=str(out), gpus_per_node=args.gpus_per_node, partition=args.partition,
        account=args.account, time_limit=args.time_limit, job_name=args.job_name,
        container_image=args.container_image, container_mounts=tuple(args.container_mount),
        container_workdir=args.container_workdir, venv=args.venv, overrides=overrides,
        signal_lead_s=args.signal_lead_s, shutdown_timeout_s=args.shutdown_timeout_s,
        max_requeues=args.max_requeues, sglang_placement=placement, sglang_nodes=sglang_nodes,
        sglang_tp=args.sglang_tp, sglang_port=args.sglang_port, sglang_model=args.sglang_model,
        sglang_urls_key=args.sglang_urls_key, sglang_ready_timeout_s=args.sglang_ready_timeout_s,
        sglang_args=tuple(args.sglang_arg), nccl_socket_ifname=args.nccl_socket_ifname,
        nccl_ib_hca=args.nccl_ib_hca, exclusive=args.exclusive, sbatch_args=tuple(args.sbatch_arg),
    )
    shown = [a for a in argv if a not in ("--print", "--submit")]
    try:
        job.validate()
        try:
            check_run_config(job)
        except ValueError as e:
            if not args.force:
                raise ValueError(f"{e} (--force renders the script anyway)") from None
            print(f"tempo-mega launch slurm: warning: {e}; rendering anyway (--force)", file=sys.stderr)
        if job.sglang_placement == "separate":  # the servers the job starts: what the config needs of them
            job = dataclasses.replace(job, sglang_args=job.sglang_args + sglang_server_flags(job))
        text = render_sbatch(job, command="tempo-mega launch slurm " + shlex.join(shown))
    except ValueError as e:
        print(f"tempo-mega launch slurm: error: {e}", file=sys.stderr)
        return 2
    if args.print_only:
        sys.stdout.write(text)
        return 0
    # SLURM opens the log before the script runs and does not create its directory.
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / SCRIPT_NAME
    path.write_text(text)
    path.chmod(0o755)
    print(f"wrote {path}")
    if not args.submit:
        print(f"submit with: sbatch {path}")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("tempo-mega launch slurm: error: sbatch is not on PATH (run this on a SLURM login node, "
              f"or copy {path} there and run `sbatch {path.name}`)", file=sys.stderr)
        return 2
    result = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
