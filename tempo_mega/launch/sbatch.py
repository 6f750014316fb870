"""Rendering of the sbatch script of a ``SlurmJob``: ``render_sbatch``.

The script is plain bash, assembled block by block: the ``#SBATCH`` lines, a header naming the command
that rendered it, a settings block (the one part meant to be edited by hand), the environment (a
Pyxis/enroot container, a virtual environment, or what is on PATH), rendezvous and NCCL variables from
SLURM's, the signal traps that forward SIGUSR1/SIGTERM to the training step, the SGLang servers of
``separate`` placement, and the ``torchrun`` launch followed by the requeue decision. What the script
does on preemption and time limits: the docstring of ``tempo_mega.launch.slurm``.
"""

from __future__ import annotations

import shlex

from tempo_mega.launch.slurm_job import REQUEUE_EXIT_CODE, REQUEUE_MARKER_NAME, SlurmJob


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
        "# TEMPO training job, rendered by tempo-mega launch slurm: re-render rather than edit, except",
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
        *([] if separate else [
            "# colocated SGLang: with rollout.sglang.launch_on=every_node (the default), each training node's first rank",
            "# launches rollout.sglang.num_engines servers on its own GPUs and pushes them the weights; every node samples",
        ]),
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
