"""The SLURM job of a TEMPO run: ``SlurmJob`` (every option the sbatch script depends on) and its checks.

``SlurmJob.validate`` rejects options SLURM or the script would trip over, naming the option;
``check_run_config`` composes the run's config as ``tempo-mega train`` would and checks that its parallel
layout fits the training ranks, before the job waits in the queue (it imports ``tempo_mega.config`` only
when called, so this module stays standard library only). The trainer's side of the requeue contract is
here too: ``REQUEUE_EXIT_CODE``, the marker file ``REQUEUE_MARKER_NAME`` and ``request_requeue``. The
contract itself is described in ``tempo_mega.launch.slurm``; the script is rendered by
``tempo_mega.launch.sbatch``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

REQUEUE_EXIT_CODE = 85
REQUEUE_MARKER_NAME = "REQUEUE_REQUESTED"
PLACEMENTS = ("colocated", "separate")
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


def sglang_server_flags(job: SlurmJob) -> tuple[str, ...]:
    """The flags the run's config asks of SGLang servers the job starts itself (separate placement) that
    ``--sglang-arg`` does not already give: ``--enable-return-routed-experts`` for routing replay
    (``algo.routing_replay``, ``rollout.sglang.return_routed_experts``) and ``--ep-size`` for
    ``rollout.sglang.ep_size``. Nothing where the config does not compose (``--force``)."""
    from tempo_mega.config import load_config

    try:
        cfg = load_config([*job.overrides, f"trainer.output_dir={job.output_dir}"])
    except Exception:
        return ()
    sg, given = cfg.rollout.sglang, {a.split("=")[0] for a in job.sglang_args}
    flags: list[str] = []
    if (cfg.algo.routing_replay != "none" or sg.return_routed_experts) and "--enable-return-routed-experts" not in given:
        flags.append("--enable-return-routed-experts")
    if sg.ep_size > 1 and "--ep-size" not in given:
        flags += ["--ep-size", str(sg.ep_size)]
    return tuple(flags)


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

