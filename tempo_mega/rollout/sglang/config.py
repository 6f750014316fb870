"""What ``rollout.sglang.*`` may say: the SGLang engine's typed config, validated on construction, and
where the trainer exports weights for each sync mode. Standard library only (torch where asked): the
run's config reads it before any engine is built; the engine (rollout/sglang/engine.py) imports it from here."""

from __future__ import annotations

from dataclasses import dataclass

_MODES = ("server", "engine")
_SYNC_MODES = ("tensor", "distributed", "disk")
_KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "bfloat16")
_LAUNCH_ON = ("every_node", "rank0")


@dataclass(frozen=True)
class SGLangConfig:
    """How to reach SGLang. ``urls`` non-empty: connect to running servers; otherwise launch
    ``num_engines`` servers (``model_path`` required), engine k on GPUs ``[k*tp_size, (k+1)*tp_size)``
    of the node that launches them: with ``launch_on=every_node`` (a multi-rank trainer) each node's first
    rank launches and owns its node's ``num_engines`` servers (node j's listen on ``base_port +
    j*num_engines + k``), with ``rank0`` only the first node's are launched."""

    mode: str = "server"  # "server" (HTTP) | "engine" (in-process sglang.Engine)
    urls: tuple[str, ...] = ()
    # launch settings
    model_path: str | None = None
    num_engines: int = 1  # per node that launches servers
    tp_size: int = 1
    # which nodes of a multi-rank trainer (backend=megatron) launch servers: every node (its first rank owns
    # them; a step's prompts are spread over all nodes' servers) or rank 0's node alone
    launch_on: str = "every_node"
    mem_fraction_static: float | None = None
    chunked_prefill_size: int | None = None
    disable_cuda_graph: bool = False
    quantization: str | None = None  # e.g. "fp8"
    kv_cache_dtype: str = "auto"  # "fp8_e4m3" halves the KV cache of 16K-token rollouts
    enable_memory_saver: bool = True  # needed by /release_memory_occupation
    # a mixture of experts: launch with --enable-return-routed-experts, so that a request may ask for the
    # experts of its tokens (return_routed_experts; the trainer sets it for algo.routing_replay=r3)
    return_routed_experts: bool = False
    # a mixture of experts: SGLang's expert parallel size inside each engine (--ep-size; 1 = experts
    # split over tp_size like the rest)
    ep_size: int = 1
    # colocated with the trainer: release the servers' GPU memory (weights, KV cache, CUDA graphs) after
    # each rollout, for the training phases; the weight push and the next generate take it back
    release_during_training: bool = True
    # after a weight push, take the KV cache and CUDA graphs back at once (true), or leave them released
    # until the next generate or probe request (false: set where the trainer hands its own memory over
    # for the rollout, trainer.offload_during_rollout, which happens after the push)
    resume_after_push: bool = True
    extra_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    base_port: int = 30000
    launch_module: str = "sglang.launch_server"  # tests point this at support.fake_sglang
    # requests and faults
    request_timeout_s: float = 3600.0  # one /generate of up to n x 16K tokens
    health_timeout_s: float = 600.0  # launch until /health answers
    max_retries: int = 2
    max_concurrent_requests: int = 1024
    # a hung server answers nothing until request_timeout_s; while requests run, every busy server's
    # /health_generate (200 while its scheduler makes progress, 503 after SGLang's own 20 s without) is
    # checked each watchdog_interval_s, and watchdog_failures failures in a row mark it hung (0 = off)
    watchdog_interval_s: float = 30.0
    watchdog_timeout_s: float = 60.0
    watchdog_failures: int = 2
    # a request SGLang aborted itself (HTTP 200, finish_reason abort: paused by another client, shutting
    # down, out of memory) is resubmitted after retry_backoff_s x 2^k (k: rounds with aborts so far), within
    # max_retries; it is never returned as a sample
    retry_backoff_s: float = 1.0
    # servers given by URL: one that goes away (node preempted, OOM restart) is waited for this long when
    # no other server is healthy, then re-synced and given its prompts again
    restart_wait_s: float = 300.0
    # the environment variable holding the servers' API key (SGLang's --api-key), sent as
    # "Authorization: Bearer <key>"; the key itself is never a config value (config.json, logs)
    api_key_env: str = "TEMPO_SGLANG_API_KEY"
    # weights
    weight_sync: str = "tensor"  # "tensor" | "distributed" | "disk"
    bucket_bytes: int = 512 * 2**20
    disk_dir: str | None = None  # where "disk" sync writes checkpoints (default: a temp dir)
    group_master_address: str = "127.0.0.1"  # "distributed": the trainer's NCCL rendezvous
    group_master_port: int = 29600
    probe: bool = True
    probe_tolerance: float = 1e-2  # max |engine - trainer| log-prob on the probe sequence
    probe_ids: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ValueError:
            return ValueError(f"rollout.sglang.{key}: {msg}")

        # Hydra hands over lists (ListConfig); keep the frozen config hashable
        for key in ("urls", "extra_args", "probe_ids"):
            object.__setattr__(self, key, tuple(getattr(self, key)))

        if self.mode not in _MODES:
            raise bad("mode", f"must be one of {_MODES}, got {self.mode!r}")
        if self.weight_sync not in _SYNC_MODES:
            raise bad("weight_sync", f"must be one of {_SYNC_MODES}, got {self.weight_sync!r}")
        if self.launch_on not in _LAUNCH_ON:
            raise bad("launch_on", f"must be one of {_LAUNCH_ON}, got {self.launch_on!r}")
        if self.kv_cache_dtype not in _KV_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {_KV_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.mode == "engine" and self.urls:
            raise bad("urls", "engine mode runs in process; urls are for mode=server")
        if self.watchdog_interval_s < 0:
            raise bad("watchdog_interval_s", f"must be >= 0 (0 = off), got {self.watchdog_interval_s}")
        for key in ("num_engines", "tp_size", "ep_size", "max_concurrent_requests", "bucket_bytes", "watchdog_failures"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_retries < 0:
            raise bad("max_retries", f"must be >= 0, got {self.max_retries}")
        for key in ("retry_backoff_s", "restart_wait_s"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("request_timeout_s", "health_timeout_s", "probe_tolerance", "watchdog_timeout_s"):
            if not getattr(self, key) > 0:
                raise bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise bad("mem_fraction_static", f"must be in (0, 1), got {self.mem_fraction_static}")
        if len(self.probe_ids) < 2:
            raise bad("probe_ids", "needs at least 2 tokens")


    def check_launchable(self) -> None:
        """What starting the engine needs beyond a valid config: a checkpoint to launch (``model_path``),
        unless running servers are given (``urls``). Checked when the engine is built: a run's config may
        leave it to a later stage (a fresh model's checkpoint is written by the trainer)."""
        if not self.urls and not self.model_path:
            raise ValueError("rollout.sglang.model_path: required to launch servers (or give urls to connect to)")


MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES (0.5.x)


def sync_device(cfg: SGLangConfig) -> str:
    """Where the trainer should export the weights for ``cfg.weight_sync``: on the GPU for the CUDA-IPC
    (tensor) and NCCL (distributed) hand-offs, on the CPU for disk (and wherever there is no GPU)."""
    import torch

    return "cuda" if cfg.weight_sync in ("tensor", "distributed") and torch.cuda.is_available() else "cpu"
