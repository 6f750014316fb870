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
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REQUEUE_EXIT_CODE",
    "REQUEUE_MARKER_NAME",
    "SlurmJob",
    "main",
    "request_requeue",
    "render_sbatch",
]

REQUEUE_EXIT_CODE = 85
REQUEUE_MARKER_NAME = "REQUEUE_REQUESTED"
PLACEMENTS = ("colocated", "separate")
SCRIPT_NAME = "tempo.sbatch"
# SLURM accepts MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM and D-HH:MM:SS
_TIME_RE = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Keys the launcher sets itself on every run: a requeued job must resume in the same place.
_RESERVED_OVERRIDES = ("trainer.output_dir", "trainer.resume")


@dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script depends on. ``output_dir`` should be absolute and on a shared
    filesystem: it holds the script, ``logs/``, the trainer's checkpoints and the requeue marker."""

    nodes: int
    output_dir: str
    gpus_per_node: int = 8
    partition: str | None = None
    account: str | None = None
    time_limit: str = "04:00:00"
    job_name: str = "tempo"
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    container_workdir: str | None = None
    venv: str | None = None
    overrides: tuple[str, ...] = ()
    signal_lead_s: int = 180
    shutdown_timeout_s: int | None = None  # None: signal_lead_s - 30, at least 30
    max_requeues: int = 20
    sglang_placement: str = "colocated"
    sglang_nodes: int = 0
    sglang_tp: int | None = None  # None: gpus_per_node
    sglang_port: int = 30000
    sglang_model: str | None = None  # None: the model.path override
    sglang_urls_key: str = "rollout.sglang.urls"
    sglang_ready_timeout_s: int = 1200
    sglang_args: tuple[str, ...] = ()
    nccl_socket_ifname: str = "^lo,docker0"
    nccl_ib_hca: str = ""
    exclusive: bool = False
    sbatch_args: tuple[str, ...] = ()

    @property
    def train_nodes(self) -> int:
        return self.nodes - self.sglang_nodes

    @property
    def shutdown_timeout(self) -> int:
        if self.shutdown_timeout_s is not None:
            return self.shutdown_timeout_s
        return max(30, self.signal_lead_s - 30)

    @property
    def server_tp(self) -> int:
        return self.sglang_tp or self.gpus_per_node

    def server_model(self) -> str | None:
        if self.sglang_model:
            return self.sglang_model
        for item in self.overrides:
            if item.startswith("model.path="):
                return item.split("=", 1)[1]
        return None

    def validate(self) -> None:
        """Raise ValueError naming the option that is wrong."""
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")
        if not _TIME_RE.match(self.time_limit):
            raise ValueError(f"--time {self.time_limit!r} is not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS, ...)")
        if not _NAME_RE.match(self.job_name):
            raise ValueError(f"--job-name {self.job_name!r}: use letters, digits and _ . + - only")
        if not self.output_dir:
            raise ValueError("--output-dir is required")
        if re.search(r"[\s%'\"$`\\]", self.output_dir):
            raise ValueError(f"--output-dir {self.output_dir!r}: no spaces, quotes, '%', '$' or backslashes "
                             "(it is written into #SBATCH lines, which the shell never expands)")
        if not 1 <= self.signal_lead_s <= 65535:
            raise ValueError(f"--signal-lead-s must be in 1..65535 (SLURM's limit), got {self.signal_lead_s}")
        if self.shutdown_timeout < 1:
            raise ValueError(f"--shutdown-timeout-s must be >= 1, got {self.shutdown_timeout}")
        if self.max_requeues < 0:
            raise ValueError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        if self.container_image and self.venv:
            raise ValueError("give --container-image or --venv, not both")
        if (self.container_mounts or self.container_workdir) and not self.container_image:
            raise ValueError("--container-mount/--container-workdir need --container-image")
        for item in self.overrides:
            key = item.split("=", 1)[0].lstrip("+~")
            if "=" not in item and not item.startswith("~"):
                raise ValueError(f"override {item!r} is not KEY=VALUE")
            if key in _RESERVED_OVERRIDES:
                raise ValueError(f"override {item!r}: the launcher sets trainer.output_dir=<--output-dir> and "
                                 "trainer.resume=auto on every run, so a requeued job resumes; use --output-dir")
        if self.sglang_placement not in PLACEMENTS:
            raise ValueError(f"--sglang-placement must be one of {PLACEMENTS}, got {self.sglang_placement!r}")
        if self.sglang_placement == "colocated":
            if self.sglang_nodes:
                raise ValueError("--sglang-nodes needs --sglang-placement separate")
            return
        if not 1 <= self.sglang_nodes < self.nodes:
            raise ValueError(f"--sglang-placement separate needs 1 <= --sglang-nodes < --nodes "
                             f"(got {self.sglang_nodes} of {self.nodes} nodes): at least one node must train")
        if self.server_tp < 1 or self.gpus_per_node % self.server_tp:
            raise ValueError(f"--sglang-tp {self.server_tp} must divide --gpus-per-node {self.gpus_per_node}")
        if not self.server_model():
            raise ValueError("--sglang-placement separate needs the model the servers load: "
                             "--sglang-model PATH or a model.path=PATH override")
        if not 1 <= self.sglang_port <= 65535:
            raise ValueError(f"--sglang-port must be a TCP port, got {self.sglang_port}")
        if not re.match(r"^[+~]?[A-Za-z_][\w.]*$", self.sglang_urls_key):
            raise ValueError(f"--sglang-urls-key {self.sglang_urls_key!r} is not a config key")


def request_requeue(reason: str = "checkpointed", env: dict[str, str] | None = None) -> int:
    """The trainer's side of the contract, after its checkpoint is complete: write the marker the
    sbatch script looks for (call it on one rank; any rank works) and return the exit code to leave
    with (every rank may exit with it). Outside such a job (no ``TEMPO_REQUEUE_MARKER``) it writes
    nothing and still returns ``REQUEUE_EXIT_CODE``."""
    env = dict(os.environ if env is None else env)
    marker = env.get("TEMPO_REQUEUE_MARKER")
    if marker:
        Path(marker).write_text(reason + "\n")
    return int(env.get("TEMPO_REQUEUE_EXIT_CODE", REQUEUE_EXIT_CODE))


def _q(value: str) -> str:
    return shlex.quote(str(value))


def render_sbatch(job: SlurmJob, command: str | None = None) -> str:
    """The sbatch script for ``job``. ``command``: the command line that rendered it (for the header)."""
    job.validate()
    out = job.output_dir.rstrip("/") or "/"
    separate = job.sglang_placement == "separate"
    container = bool(job.container_image)

    sbatch = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --time={job.time_limit}",
    ]
    if job.partition:
        sbatch.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        sbatch.append(f"#SBATCH --account={job.account}")
    if job.exclusive:
        sbatch.append("#SBATCH --exclusive")
    sbatch += [
        f"#SBATCH --output={out}/logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{job.signal_lead_s}",
    ]
    sbatch += [f"#SBATCH {arg}" for arg in job.sbatch_args]

    header = [
        "#",
        "# TEMPO training job, rendered by tempo_mega/launch/slurm.py: re-render rather than edit, except",
        "# the settings block below.",
    ]
    if command:
        header += ["#", f"#   {command}"]
    header += [
        "#",
        f"# Preemption: SLURM sends SIGUSR1 {job.signal_lead_s} s before the time limit. The trap below forwards it",
        "# (and SIGTERM) to the training step; torchrun passes it to every rank and gives them",
        "# SHUTDOWN_TIMEOUT_S to checkpoint. A trainer that checkpointed and wants to go on exits",
        f"# {REQUEUE_EXIT_CODE} and writes $TEMPO_REQUEUE_MARKER (torchrun hides the ranks' exit codes); this script",
        "# then runs `scontrol requeue`, and the requeued job resumes: every run passes trainer.resume=auto.",
        "",
        "set -euo pipefail",
        "",
    ]

    settings = [
        "# ---- settings ----",
        f"OUT={_q(out)}  # this script, logs/, the trainer's output_dir (checkpoints), the requeue marker",
        f"GPUS_PER_NODE={job.gpus_per_node}",
        f"SGLANG_NODES={job.sglang_nodes if separate else 0}  # nodes at the end of the allocation that serve SGLang "
        f"({job.sglang_placement} placement)",
        "# torchrun forwards these to every rank, then waits SHUTDOWN_TIMEOUT_S before killing them",
        'TORCHRUN_SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"',
        f"SHUTDOWN_TIMEOUT_S={job.shutdown_timeout}",
        f"REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}",
        f'REQUEUE_MARKER="$OUT/{REQUEUE_MARKER_NAME}"',
        f"MAX_REQUEUES={job.max_requeues}",
    ]
    if container:
        mounts = (f"{out}:{out}", *job.container_mounts)
        settings += [
            f"CONTAINER_IMAGE={_q(job.container_image or '')}  # Pyxis/enroot: docker URI (nvcr.io#nvidia/...) or .sqsh",
            f"CONTAINER_MOUNTS={_q(','.join(mounts))}",
        ]
    if separate:
        settings += [
            f"SGLANG_MODEL={_q(job.server_model() or '')}",
            f"SGLANG_TP={job.server_tp}",
            f"SGLANG_PORT={job.sglang_port}",
            "# the trainer override that receives the servers' URLs; rename it to match the rollout config",
            f"SGLANG_URLS_KEY={_q(job.sglang_urls_key)}",
            f'SGLANG_READY_TIMEOUT_S="${{SGLANG_READY_TIMEOUT_S:-{job.sglang_ready_timeout_s}}}"  # 0: do not wait',
            "SGLANG_EXTRA_ARGS=(" + " ".join(_q(a) for a in job.sglang_args) + ")",
        ]
    settings.append("TRAIN_ARGS=(")
    settings += [f"  {_q(o)}" for o in job.overrides]
    settings += ['  "trainer.output_dir=$OUT"', "  trainer.resume=auto", ")", ""]

    if container:
        env = [
            "# ---- environment: every srun step runs in this container (Pyxis) ----",
            'CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS"'
            + (f" --container-workdir={_q(job.container_workdir)}" if job.container_workdir else "") + ")",
            "",
        ]
    elif job.venv:
        env = [
            "# ---- environment: a virtual environment on the shared filesystem (srun passes it on) ----",
            f"VENV={_q(job.venv)}",
            "# shellcheck disable=SC1091  # the venv exists only on the cluster",
            'source "$VENV/bin/activate"',
            "",
        ]
    else:
        env = ["# ---- environment: the python, torchrun and packages on PATH when the job starts ----", ""]
    cargs = ' "${CONTAINER_ARGS[@]}"' if container else ""

    rendezvous = [
        "# ---- rendezvous, from SLURM's variables ----",
        'mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "# the job id survives a requeue, so a requeued job gets the same port; other jobs get others",
        "MASTER_PORT=$(( 10000 + SLURM_JOB_ID % 20000 ))",
        "TRAIN_NODES=$(( SLURM_NNODES - SGLANG_NODES ))",
        "WORLD_SIZE=$(( TRAIN_NODES * GPUS_PER_NODE ))",
        'TRAIN_HOSTS=$(IFS=,; echo "${HOSTS[*]:0:TRAIN_NODES}")',
        "export MASTER_ADDR MASTER_PORT WORLD_SIZE",
        "if (( ${#HOSTS[@]} != SLURM_NNODES || TRAIN_NODES < 1 )); then",
        '  echo "[tempo] expected $SLURM_NNODES hosts with $SGLANG_NODES for SGLang, got: ${HOSTS[*]}" >&2',
        "  exit 1",
        "fi",
        "",
        "# ---- NCCL and torch.distributed: the one place for these; values set before sbatch win ----",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        "# interfaces for NCCL's bootstrap and socket transport; '^lo,docker0' means any but these",
        f'export NCCL_SOCKET_IFNAME="${{NCCL_SOCKET_IFNAME:-{job.nccl_socket_ifname}}}"',
        'export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"',
        "# InfiniBand/RoCE adapters (e.g. mlx5 or =mlx5_0:1,mlx5_1:1); empty: NCCL picks",
        f'NCCL_IB_HCA="${{NCCL_IB_HCA:-{job.nccl_ib_hca}}}"',
        'if [[ -n "$NCCL_IB_HCA" ]]; then export NCCL_IB_HCA; else unset NCCL_IB_HCA; fi',
        "# a failed or timed-out collective aborts the process instead of hanging the job",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "export PYTHONUNBUFFERED=1",
        "# the trainer's side of the requeue contract",
        'export TEMPO_REQUEUE_EXIT_CODE="$REQUEUE_EXIT_CODE" TEMPO_REQUEUE_MARKER="$REQUEUE_MARKER"',
        "",
    ]

    signals = [
        "# ---- signals: forward SIGUSR1/SIGTERM to the training step; stop what this script started ----",
        'TRAIN_PID=""',
        'CAUGHT_SIGNAL=""',
    ]
    if separate:
        signals.append("SGLANG_PIDS=()")
    signals += [
        "# shellcheck disable=SC2317,SC2329  # reached through the traps",
        "forward_signal() {",
        "  CAUGHT_SIGNAL=$1",
        '  echo "[tempo] $(date -Is) caught SIG$1; forwarding it to the training step (pid ${TRAIN_PID:-not started})"',
        '  if [[ -n "$TRAIN_PID" ]]; then kill -s "$1" "$TRAIN_PID" 2>/dev/null || true; fi',
        "}",
        "trap 'forward_signal USR1' USR1",
        "trap 'forward_signal TERM' TERM",
        "# shellcheck disable=SC2317,SC2329  # reached through the EXIT trap",
        "cleanup() {",
        "  local pid",
    ]
    if separate:
        signals += [
            '  for pid in ${SGLANG_PIDS[@]+"${SGLANG_PIDS[@]}"}; do',
            '    kill "$pid" 2>/dev/null || true  # srun passes SIGTERM on to the server on its node',
            "  done",
        ]
    signals += [
        '  pid=$TRAIN_PID',
        '  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi',
        "}",
        "trap cleanup EXIT",
        "# `wait` returns 128+N when a trapped signal arrives while the step still runs: then wait again",
        "wait_step() {",
        "  local pid=$1 again",
        "  while true; do",
        "    STEP_RC=0",
        '    wait "$pid" || STEP_RC=$?',
        '    if (( STEP_RC > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi',
        "    if (( STEP_RC > 128 )); then  # the step may have ended right after the signal: collect its status",
        '      again=0; wait "$pid" 2>/dev/null || again=$?',
        "      if (( again != 127 )); then STEP_RC=$again; fi",
        "    fi",
        "    return 0",
        "  done",
        "}",
        "",
    ]

    servers: list[str] = []
    if separate:
        servers = [
            "# ---- SGLang servers: one per node on the last SGLANG_NODES nodes (TP x DP = GPUS_PER_NODE) ----",
            "# a key for this run of the job (SGLang's --api-key): the servers want it on every route but /health,",
            "# the trainer sends it from TEMPO_SGLANG_API_KEY (srun passes the environment on). Made at run time:",
            "# never in this script, its log or the trainer's config.json",
            "TEMPO_SGLANG_API_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')",
            "export TEMPO_SGLANG_API_KEY",
            "SGLANG_URLS=()",
            'for host in "${HOSTS[@]:TRAIN_NODES}"; do',
            "  # bound to the node's cluster address (what $host resolves to: the URL the trainer uses)",
            f'  srun --nodes=1 --ntasks=1 --nodelist="$host"{cargs} \\',
            '    --output="$OUT/logs/sglang-$SLURM_JOB_ID-$host.out" --open-mode=append \\',
            '    python -m sglang.launch_server --model-path "$SGLANG_MODEL" --tp-size "$SGLANG_TP" \\',
            '    --dp-size "$(( GPUS_PER_NODE / SGLANG_TP ))" --host "$host" --port "$SGLANG_PORT" \\',
            '    --api-key "$TEMPO_SGLANG_API_KEY" ${SGLANG_EXTRA_ARGS[@]+"${SGLANG_EXTRA_ARGS[@]}"} &',
            '  SGLANG_PIDS+=("$!")',
            '  SGLANG_URLS+=("http://$host:$SGLANG_PORT")',
            "done",
            'printf \'%s\\n\' "${SGLANG_PIDS[@]}" > "$OUT/logs/sglang-$SLURM_JOB_ID.pids"',
            'echo "[tempo] SGLang servers ${SGLANG_URLS[*]} (srun pids ${SGLANG_PIDS[*]})"',
            "wait_for_sglang() {",
            "  local deadline=$(( SECONDS + SGLANG_READY_TIMEOUT_S )) i",
            "  (( SGLANG_READY_TIMEOUT_S > 0 )) || return 0",
            "  if ! command -v curl >/dev/null; then",
            '    echo "[tempo] no curl on $(hostname): not waiting for the SGLang servers" >&2; return 0',
            "  fi",
            '  for i in "${!SGLANG_URLS[@]}"; do',
            '    until curl -sf --max-time 5 "${SGLANG_URLS[$i]}/health" >/dev/null; do',
            '      [[ -z "$CAUGHT_SIGNAL" ]] || return 0',
            '      if ! kill -0 "${SGLANG_PIDS[$i]}" 2>/dev/null; then',
            '        echo "[tempo] SGLang server ${SGLANG_URLS[$i]} exited while starting: see $OUT/logs/" >&2; exit 1',
            "      fi",
            "      if (( SECONDS >= deadline )); then",
            '        echo "[tempo] SGLang server ${SGLANG_URLS[$i]} not ready after ${SGLANG_READY_TIMEOUT_S}s" >&2; exit 1',
            "      fi",
            "      sleep 5",
            "    done",
            "  done",
            "}",
            "wait_for_sglang",
            'TRAIN_ARGS+=("$SGLANG_URLS_KEY=[$(IFS=,; echo "${SGLANG_URLS[*]}")]")',
            "",
        ]

    launch = [
        "# ---- training: one torchrun per training node ----",
        'rm -f "$REQUEUE_MARKER"',
        'if [[ "$CAUGHT_SIGNAL" == TERM ]]; then exit 143; fi',
        'if [[ "$CAUGHT_SIGNAL" == USR1 ]]; then',
        '  echo "[tempo] time limit near before training started: requeueing"',
        '  scontrol requeue "$SLURM_JOB_ID"; exit 0',
        "fi",
        'echo "[tempo] job $SLURM_JOB_ID (requeued ${SLURM_RESTART_COUNT:-0} times): $TRAIN_NODES node(s) x' +
        ' $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "LAUNCH=(",
        '  torchrun --nnodes "$TRAIN_NODES" --nproc-per-node "$GPUS_PER_NODE"',
        '  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"',
        "  --max-restarts 0 --signals-to-handle \"$TORCHRUN_SIGNALS\"",
        '  --shutdown-timeout "$SHUTDOWN_TIMEOUT_S"',
        '  -m tempo_mega.cli train "${TRAIN_ARGS[@]}"',
        ")",
        "printf -v LAUNCH_CMD '%q ' \"${LAUNCH[@]}\"",
        "# shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, inside the step",
        f'srun --nodes="$TRAIN_NODES" --ntasks="$TRAIN_NODES" --ntasks-per-node=1 --nodelist="$TRAIN_HOSTS"{cargs} \\',
        "  --kill-on-bad-exit=1 bash -c 'export NODE_RANK=$SLURM_NODEID; exec '\"$LAUNCH_CMD\" &",
        "TRAIN_PID=$!",
        'wait_step "$TRAIN_PID"',
        "TRAIN_RC=$STEP_RC",
        'TRAIN_PID=""',
        'echo "[tempo] $(date -Is) training step exited with status $TRAIN_RC"',
        "",
        "# ---- requeue when the trainer checkpointed and asked for it ----",
        'if [[ "$TRAIN_RC" -eq "$REQUEUE_EXIT_CODE" || -f "$REQUEUE_MARKER" ]]; then',
        '  rm -f "$REQUEUE_MARKER"',
        "  if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then",
        '    echo "[tempo] requeue asked, but the job was requeued ${SLURM_RESTART_COUNT:-0} times" \\',
        '      "(MAX_REQUEUES=$MAX_REQUEUES): stopping; resubmit this script to go on" >&2',
        '    exit "$REQUEUE_EXIT_CODE"',
        "  fi",
        '  echo "[tempo] checkpoint written: requeueing job $SLURM_JOB_ID; it resumes from $OUT/checkpoints"',
        '  if ! scontrol requeue "$SLURM_JOB_ID"; then',
        '    echo "[tempo] scontrol requeue failed (a cancelled job cannot be requeued)" >&2',
        '    exit "$REQUEUE_EXIT_CODE"',
        "  fi",
        "  exit 0",
        "fi",
        'exit "$TRAIN_RC"',
    ]
    return "\n".join(sbatch + header + settings + env + rendezvous + signals + servers + launch) + "\n"


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
    p.add_argument("--sglang-placement", choices=PLACEMENTS, default=d.sglang_placement)
    p.add_argument("--sglang-nodes", type=int, default=0, help="with separate placement: nodes that run SGLang")
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


def check_run_config(job: SlurmJob) -> None:
    """What ``tempo-mega train`` would check on the cluster, before the job waits in the queue: the
    overrides compose and validate (the same ``load_config``), and the parallel layout fits the training
    ranks (``--nodes`` minus the SGLang nodes, times ``--gpus-per-node``). Raises ValueError naming the
    key or the option."""
    from tempo_mega.config import load_config, megatron_config

    cfg = load_config([*job.overrides, f"trainer.output_dir={job.output_dir}", "trainer.resume=auto"])
    world = job.train_nodes * job.gpus_per_node
    ranks = f"{job.train_nodes} training node(s) x --gpus-per-node {job.gpus_per_node} = {world} ranks"
    if cfg.backend == "torch" and world > 1:
        raise ValueError(f"backend=torch trains in one process, but the job starts {ranks}: use backend=megatron "
                         "(an experiment=qwen3_* preset) or --nodes 1 --gpus-per-node 1")
    if cfg.backend == "megatron":
        mc = megatron_config(cfg)
        try:
            mc.data_parallel_size(world)
        except ValueError as e:
            raise ValueError(f"the layout does not fit: {e}, with {ranks}; give --nodes so that the ranks are a "
                             f"multiple of {mc.model_parallel_size}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    out = Path(args.output_dir).expanduser()
    out = out if out.is_absolute() else Path.cwd() / out
    job = SlurmJob(
        nodes=args.nodes, output_dir=str(out), gpus_per_node=args.gpus_per_node, partition=args.partition,
        account=args.account, time_limit=args.time_limit, job_name=args.job_name,
        container_image=args.container_image, container_mounts=tuple(args.container_mount),
        container_workdir=args.container_workdir, venv=args.venv, overrides=tuple(args.overrides),
        signal_lead_s=args.signal_lead_s, shutdown_timeout_s=args.shutdown_timeout_s,
        max_requeues=args.max_requeues, sglang_placement=args.sglang_placement, sglang_nodes=args.sglang_nodes,
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
