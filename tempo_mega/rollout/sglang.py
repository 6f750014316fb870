"""SGLangRolloutEngine: the RolloutEngine seam over SGLang servers (HTTP) or an in-process ``sglang.Engine``.

Written against SGLang 0.5.x's HTTP API as read in its source (``srt/entrypoints/http_server.py``,
``srt/managers/io_struct.py``): ``GenerateReqInput``, ``UpdateWeightFromDiskReqInput`` (``model_path``),
``UpdateWeightsFromTensorReqInput`` (``serialized_named_tensors``: one base64 string per TP rank),
``InitWeightsUpdateGroupReqInput`` / ``UpdateWeightsFromDistributedReqInput`` (``names``, ``dtypes``,
``shapes``, ``group_name``), ``Release/ResumeMemoryOccupationReqInput`` (``tags``), ``AbortReq``
(``rid``, ``abort_all``). Tensor and distributed updates are wrapped in ``/begin_weight_update`` ...
``/end_weight_update`` (0.5.23); an older server that answers 404 there is driven without them.

Generation: one ``/generate`` request per prompt with ``sampling_params.n = n``, all prompts submitted at
once (a thread per in-flight request). Per prompt rather than per sample because SGLang then prefills the
shared prompt once and the n samples share its KV prefix; the unit of retry is the prompt, so results are
keyed by prompt index and a resubmitted prompt replaces, never adds to, what it had.

Memory: colocated with the trainer, the servers release their GPU memory (``MEMORY_TAGS``) after each
rollout (the controller calls ``release_memory`` where ``release_during_training``); ``update_weights``
takes the weights back before the push and the rest after it, ``generate`` whatever is still released.
Released tags are tracked per server because SGLang fails a resume of a tag it has not released.

Log-probs: SGLang returns ``log(probs)`` after temperature and before top-p/top-k truncation (the same
contract as ``Sample.logprobs`` and the HF engine). ``SamplingParams.seed`` is not sent (SGLang's
per-request seed needs deterministic inference mode); this is said once in the log.

Faults: a request that times out, a refused/reset connection or an HTTP 5xx marks its server failed, and
so does a watchdog that, while requests run, checks each busy server's ``/health_generate`` (a hung
server is found in about ``watchdog_interval_s x watchdog_failures``, not after ``request_timeout_s``). A
server we launched is restarted (its pid terminated, then killed), a server given by URL is marked down
until ``/health`` answers again; either gets the last weights again (last disk checkpoint, or
``weights_source()``) before it serves. The failed prompts are resubmitted, at most ``max_retries`` times
each; then a RuntimeError names the prompts and the last error. Where the engine has neither (tensor or
distributed sync without ``weights_source``: a multi-rank trainer, whose weight export is a collective),
``generate`` raises ``RolloutNeedsWeights`` and the caller streams the weights with ``resync_stale``;
a server without the current weights is never given a request. When no server is healthy, given ones are
waited for (``restart_wait_s``). A request SGLang aborted itself (finish_reason abort) is resubmitted after
a backoff, never returned. A weight-update session is ended on every exit path. Calls given up (a hung
server) and all calls at ``shutdown`` have their sockets closed, and run on daemon threads, so a failed run
exits at once. Requests are fitted to the servers' context length, read at start.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import http.client
import importlib.util
import json
import logging
import math
import operator
import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import torch
from torch import Tensor

from tempo_mega.rollout.base import RolloutNeedsWeights, Sample, SamplingParams, check_generate_args

__all__ = [
    "SGLangConfig",
    "SGLangRolloutEngine",
    "SGLangServerError",
    "build_sglang_engine",
    "bucket_named_tensors",
    "MEMORY_TAGS",
    "redact_command",
    "sync_device",
]

log = logging.getLogger(__name__)
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)

_MODES = ("server", "engine")
_SYNC_MODES = ("tensor", "distributed", "disk")
_KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "bfloat16")


@dataclass(frozen=True)
class SGLangConfig:
    """How to reach SGLang. ``urls`` non-empty: connect to running servers; otherwise launch
    ``num_engines`` servers (``model_path`` required), engine k on GPUs ``[k*tp_size, (k+1)*tp_size)``."""

    mode: str = "server"  # "server" (HTTP) | "engine" (in-process sglang.Engine)
    urls: tuple[str, ...] = ()
    # launch settings
    model_path: str | None = None
    num_engines: int = 1
    tp_size: int = 1
    mem_fraction_static: float | None = None
    chunked_prefill_size: int | None = None
    disable_cuda_graph: bool = False
    quantization: str | None = None  # e.g. "fp8"
    kv_cache_dtype: str = "auto"  # "fp8_e4m3" halves the KV cache of 16K-token rollouts
    enable_memory_saver: bool = True  # needed by /release_memory_occupation
    # colocated with the trainer: release the servers' GPU memory (weights, KV cache, CUDA graphs) after
    # each rollout, for the training phases; the weight push and the next generate take it back
    release_during_training: bool = True
    extra_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    base_port: int = 30000
    launch_module: str = "sglang.launch_server"  # tests point this at tempo_mega.rollout.fake_sglang
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
        if self.kv_cache_dtype not in _KV_DTYPES:
            raise bad("kv_cache_dtype", f"must be one of {_KV_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.mode == "engine" and self.urls:
            raise bad("urls", "engine mode runs in process; urls are for mode=server")
        if not self.urls and not self.model_path:
            raise bad("model_path", "required to launch servers (or give urls to connect to)")
        if self.watchdog_interval_s < 0:
            raise bad("watchdog_interval_s", f"must be >= 0 (0 = off), got {self.watchdog_interval_s}")
        for key in ("num_engines", "tp_size", "max_concurrent_requests", "bucket_bytes", "watchdog_failures"):
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


class SGLangServerError(RuntimeError):
    """A server answered with an error (HTTP 4xx): a bad request, not a fault; never retried."""


class _ServerDown(RuntimeError):
    """A server did not answer: timeout, refused/reset connection, HTTP 5xx. Caught and recovered from
    inside the engine; a RuntimeError (naming the URL) where it does surface."""


class _ServerAbort(RuntimeError):
    """A server answered a request with finish_reason abort that this engine did not ask for. The server is
    not at fault (it stays in use); the prompt is resubmitted after a backoff."""


MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES (0.5.x)


def sync_device(cfg: SGLangConfig) -> str:
    """Where the trainer should export the weights for ``cfg.weight_sync``: on the GPU for the CUDA-IPC
    (tensor) and NCCL (distributed) hand-offs, on the CPU for disk (and wherever there is no GPU)."""
    return "cuda" if cfg.weight_sync in ("tensor", "distributed") and torch.cuda.is_available() else "cpu"


def bucket_named_tensors(
    named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, Tensor]]]:
    """Group a stream of named tensors into lists of at most ``bucket_bytes`` (a bigger tensor alone)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------------------- HTTP


class _Transport:
    """JSON over HTTP to SGLang servers, with the job's API key (``Authorization: Bearer``, as SGLang's
    ``--api-key`` middleware wants) and a record of the connections in flight. ``close(url)`` shuts their
    sockets: a thread blocked reading a hung server's answer fails at once instead of living until
    ``request_timeout_s`` (an hour) and holding the process, and its SLURM allocation, after the run failed."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._open: dict[int, tuple[str, http.client.HTTPConnection]] = {}

    def call(self, url: str, path: str, body: dict | None, timeout_s: float, method: str = "POST"):
        """One JSON request. Returns the parsed JSON body (or the text if not JSON). Raises ``_ServerDown``
        for timeouts, connection errors and 5xx, ``SGLangServerError`` for other HTTP errors."""
        parts = urllib.parse.urlsplit(url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname or "", parts.port, timeout=timeout_s)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        key = id(conn)
        with self._lock:
            self._open[key] = (url, conn)
        try:
            conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        except (TimeoutError, ConnectionError, HTTPException, OSError) as e:
            raise _ServerDown(f"{url}{path}: {type(e).__name__}: {e}") from e
        finally:
            with self._lock:
                self._open.pop(key, None)
            conn.close()
        if status >= 500:
            raise _ServerDown(f"{url}{path}: HTTP {status}: {raw.decode(errors='replace')[:2000]}")
        if status == 401:
            raise SGLangServerError(
                f"{url}{path}: HTTP 401: the server wants an API key (SGLang's --api-key); this client "
                + ("sent one that it refused" if self.api_key else "has none: set it in the environment variable "
                   "that rollout.sglang.api_key_env names")
            )
        if status >= 400:
            raise SGLangServerError(f"{url}{path}: HTTP {status}: {raw.decode(errors='replace')[:2000]}")
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode(errors="replace")

    def close(self, url: str | None = None) -> int:
        """Shut the sockets of the calls in flight to ``url`` (None: to every server); returns how many.
        Only ``shutdown(2)`` here: the thread that owns a connection closes it as its call fails."""
        with self._lock:
            conns = [c for u, c in self._open.values() if url is None or u == url]
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed
        return len(conns)


def _http(url: str, path: str, body: dict | None, timeout_s: float, method: str = "POST"):
    """One JSON request without an API key (tests, tools); the engine sends its own through ``_Transport``."""
    return _Transport().call(url, path, body, timeout_s, method=method)


class _DaemonPool:
    """A fixed pool of daemon worker threads. ``concurrent.futures`` joins its workers when the interpreter
    exits, before atexit handlers run, so one worker blocked on a hung server kept the process alive after the
    run had failed; daemon workers are not waited for (and ``_Transport.close`` ends their calls anyway)."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = workers
        for k in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{k}", daemon=True).start()

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 (handed to the waiting caller, as concurrent.futures does)
                fut.set_exception(e)

    def shutdown(self) -> None:
        """Cancel what has not started; the workers end after their current call."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in range(self._workers):
            self._queue.put(None)


def _check_success(resp, what: str) -> None:
    """Weight-update endpoints answer ``{"success": bool, "message": str}``; 0.4 servers a tuple-like list."""
    if isinstance(resp, dict) and resp.get("success") is False:
        raise SGLangServerError(f"{what} failed: {resp.get('message')}")
    if isinstance(resp, (list, tuple)) and resp and resp[0] is False:
        raise SGLangServerError(f"{what} failed: {resp[1:]}")


_SECRET_FLAG_WORDS = ("key", "token", "secret", "password")


def redact_command(cmd: Sequence[str]) -> list[str]:
    """``cmd`` with the values of secret flags (``--api-key``, ``--hf-token``, ...: any flag naming a key,
    token, secret or password, as ``--flag VALUE`` or ``--flag=VALUE``) replaced by ``***``, for logs."""
    out: list[str] = []
    hide_next = False
    for arg in cmd:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _value = arg.partition("=")
        secret = flag.startswith("--") and any(w in flag.lower() for w in _SECRET_FLAG_WORDS)
        if secret and eq:
            out.append(f"{flag}=***")
        else:
            out.append(arg)
            hide_next = secret
    return out


def _log_tail(path: Path | None, lines: int = 30) -> str:
    """The last ``lines`` lines of a server log and its path, for the error of a failed launch."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError as e:
        return f"; log {path} unreadable: {e}"
    text = "\n".join("    " + line for line in tail) or "    (empty)"
    hint = ""
    if any("No module named 'sglang'" in line or "No module named sglang" in line for line in tail):
        hint = "\n  sglang is not installed for this Python: pip install -e '.[sglang]'"
    return f"; the last lines of its log {path}:\n{text}{hint}"


def _context_tokens(info) -> int | None:
    """Most prompt + response tokens per request from a /server_info answer: context_length - 1 (SGLang
    refuses prompt + max_new_tokens >= context_length) where reported, else max_req_input_len."""
    if not isinstance(info, dict):
        return None
    ctx = info.get("context_length")
    if isinstance(ctx, int) and ctx > 1:
        return ctx - 1
    limit = info.get("max_req_input_len")
    return limit if isinstance(limit, int) and limit > 0 else None


@dataclass
class _Server:
    url: str
    proc: subprocess.Popen | None = None  # set when we launched it
    port: int | None = None
    healthy: bool = True
    outstanding: int = 0
    restarts: int = 0
    weights_stale: bool = False  # needs the last weights again before serving
    last_error: str = ""
    epoch: int = 0  # +1 each time it is marked failed: a late answer to an older request changes nothing
    released: set[str] = field(default_factory=set)  # memory tags it has released (SGLang tracks the same)
    session_open: bool = False  # a /begin_weight_update of ours that no /end_weight_update has closed
    log_path: Path | None = None  # where a launched server writes its output

    def fail(self, epoch: int, error: str) -> None:
        """Mark it failed, unless it was already marked so since the request of ``epoch`` was sent."""
        if epoch == self.epoch:
            self.healthy, self.last_error, self.epoch = False, error, self.epoch + 1

    @property
    def launched(self) -> bool:
        return self.port is not None


@dataclass
class _PromptResult:
    samples: list[Sample] = field(default_factory=list)
    attempts: int = 0
    last_error: str = ""


class _Watchdog(threading.Thread):
    """While a round of requests runs: each ``watchdog_interval_s``, GET ``/health_generate`` of every
    healthy server with requests outstanding; ``watchdog_failures`` failures in a row mark it failed
    ("hung"), which ends the round's wait for its requests."""

    def __init__(self, engine: SGLangRolloutEngine):
        super().__init__(name="sglang-watchdog", daemon=True)
        self.engine, self._stop_event = engine, threading.Event()
        self._failures: dict[str, int] = {}

    def stop(self) -> None:
        """Stop, and wait for a check in flight: its request must not overlap a memory release (SGLang
        releases only when idle)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=self.engine.cfg.watchdog_timeout_s)

    def run(self) -> None:
        cfg = self.engine.cfg
        while not self._stop_event.wait(cfg.watchdog_interval_s):
            for s in list(self.engine.servers):
                if self._stop_event.is_set() or not s.healthy or s.outstanding == 0:
                    continue
                epoch = s.epoch
                try:
                    self.engine._http(s.url, "/health_generate", None, cfg.watchdog_timeout_s, method="GET")
                    self._failures[s.url] = 0
                except (_ServerDown, SGLangServerError) as e:
                    k = self._failures[s.url] = self._failures.get(s.url, 0) + 1
                    if k >= cfg.watchdog_failures:
                        log.warning("SGLang server %s is hung: %d health checks failed in a row (%s)", s.url, k, e)
                        s.fail(epoch, f"hung: {k} /health_generate checks failed in a row, the last: {e}")


def server_process_kwargs(cmd: list[str], workdir: Path) -> dict:
    """How a ``python -m`` server is started so that the current folder is not the first entry of its
    sys.path: started from this repository's top, ``kernels/`` would shadow the ``kernels`` package that
    transformers (and so SGLang) imports. Python >= 3.11: PYTHONSAFEPATH; 3.10: the server runs in
    ``workdir`` (its log folder), with a local ``--model-path`` made absolute first (``cmd`` is edited)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if sys.version_info >= (3, 11):
        return {"env": env}
    if "--model-path" in cmd:
        i = cmd.index("--model-path") + 1
        if i < len(cmd) and os.path.exists(cmd[i]):
            cmd[i] = os.path.abspath(cmd[i])
    return {"env": env, "cwd": str(workdir)}


class SGLangRolloutEngine:
    """RolloutEngine over SGLang. Build with ``build_sglang_engine``; see the module docstring."""

    def __init__(
        self,
        cfg: SGLangConfig,
        *,
        pad_token_id: int,
        trainer_logprob_fn: Callable[[list[int]], Sequence[float] | Tensor] | None = None,
        weights_source: Callable[[], Iterable[tuple[str, Tensor]]] | None = None,
        start: bool = True,
        log_dir: str | Path | None = None,
        max_response_tokens: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.trainer_logprob_fn = trainer_logprob_fn
        self.weights_source = weights_source
        self.servers: list[_Server] = []
        self.pids: list[int] = []  # every process we started, for shutdown and for the record
        self.last_metrics: dict[str, float] = {}
        self._lock = threading.Lock()
        self._aborting = threading.Event()
        self._finished: dict[int, list[Sample]] = {}
        self._engine = None  # in-process sglang.Engine
        self._engine_memory = _Server(url="engine")  # its released memory tags
        self._disk_root: Path | None = None
        self._last_disk_dir: Path | None = None
        self._disk_version = 0
        self._group_ready = False
        self._synced = False
        self._group = None
        self._begin_end_supported: dict[str, bool] = {}
        self._warned_seed = False
        self._closed = False
        self._stop_event = threading.Event()  # set by shutdown: ends backoff and restart waits
        # launched servers' logs: under the run's output dir where given, else a temp dir made at the first
        # launch and removed at shutdown (the error of a failed launch carries the log's last lines)
        self._log_dir_given = Path(log_dir) if log_dir is not None else None
        self._log_dir: Path | None = None
        self.max_response_tokens = max_response_tokens
        self.context_tokens: int | None = None  # most prompt + response tokens a request may have (all servers)
        # the key from the environment (launch slurm exports it for its servers); servers we launch get it,
        # or one made for this process
        key = os.environ.get(cfg.api_key_env) or None
        # (not with several tokenizer workers: SGLang refuses an API key there)
        if key is None and cfg.mode == "server" and not cfg.urls and not any(
            a.startswith("--tokenizer-worker-num") for a in cfg.extra_args
        ):
            key = secrets.token_hex(32)  # hex: never starts with '-', which argparse would read as a flag
        self._transport = _Transport(api_key=key)
        self._http = self._transport.call
        atexit.register(self.shutdown)
        if start:
            try:
                self.start()
            except BaseException:
                self.shutdown()  # stop what did start, remove temp dirs: nothing outlives a failed start
                raise

    @property
    def weights_device(self) -> str:
        return sync_device(self.cfg)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.cfg
        if cfg.mode == "engine":
            self._engine = self._make_inprocess_engine()
        elif cfg.urls:
            self.servers = [_Server(url=u.rstrip("/")) for u in cfg.urls]
            for s in self.servers:
                self._wait_healthy(s, proc=None)
        else:
            self._check_launch_module()
            for k in range(cfg.num_engines):
                port = cfg.base_port + k
                s = _Server(url=f"http://{cfg.host}:{port}", port=port)
                self.servers.append(s)
                self._launch(s, k)
            for s in self.servers:
                self._wait_healthy(s, proc=s.proc)
        self._read_context_length()

    def _check_launch_module(self) -> None:
        """The servers run ``python -m launch_module`` with this interpreter: without it installed, say so in
        one line rather than after a launch whose cause is only in its log."""
        top = self.cfg.launch_module.split(".")[0]
        if importlib.util.find_spec(top) is None:
            hint = " (pip install -e '.[sglang]')" if top == "sglang" else ""
            raise RuntimeError(
                f"rollout.sglang.launch_module={self.cfg.launch_module!r}: {top} is not installed for "
                f"{sys.executable}{hint}; or give running servers with rollout.sglang.urls"
            )

    def _launch_command(self, port: int, engine_index: int, model_path: str) -> list[str]:
        cfg = self.cfg
        cmd = [sys.executable, "-m", cfg.launch_module, "--model-path", model_path]
        cmd += ["--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp_size)]
        cmd += ["--base-gpu-id", str(engine_index * cfg.tp_size)]
        if cfg.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
        if cfg.chunked_prefill_size is not None:
            cmd += ["--chunked-prefill-size", str(cfg.chunked_prefill_size)]
        if cfg.disable_cuda_graph:
            cmd += ["--disable-cuda-graph"]
        if cfg.quantization:
            cmd += ["--quantization", cfg.quantization]
        if cfg.kv_cache_dtype != "auto":
            cmd += ["--kv-cache-dtype", cfg.kv_cache_dtype]
        if cfg.enable_memory_saver:
            cmd += ["--enable-memory-saver"]
        if self._transport.api_key and not any(a.split("=")[0] == "--api-key" for a in cfg.extra_args):
            cmd.append(f"--api-key={self._transport.api_key}")  # '=' form: a key may start with '-'
        return cmd + list(cfg.extra_args)

    def _ensure_log_dir(self) -> Path:
        if self._log_dir is None:
            if self._log_dir_given is not None:
                self._log_dir_given.mkdir(parents=True, exist_ok=True)
                self._log_dir = self._log_dir_given
            else:
                self._log_dir = Path(tempfile.mkdtemp(prefix="tempo_sglang_logs_"))
        return self._log_dir

    def _launch(self, s: _Server, engine_index: int) -> None:
        assert s.port is not None and self.cfg.model_path is not None
        cmd = self._launch_command(s.port, engine_index, self.cfg.model_path)
        s.log_path = self._ensure_log_dir() / f"server{engine_index}_{s.restarts}.log"
        with open(s.log_path, "wb") as logf:  # the child keeps its own descriptor
            s.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      **server_process_kwargs(cmd, s.log_path.parent))
        self.pids.append(s.proc.pid)
        log.info("launched SGLang server pid %d on %s (log %s): %s", s.proc.pid, s.url, s.log_path,
                 " ".join(redact_command(cmd)))

    def _wait_healthy(self, s: _Server, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + self.cfg.health_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"SGLang server {s.url} (pid {proc.pid}) exited with code {proc.returncode} while starting"
                    + _log_tail(s.log_path)
                )
            try:
                self._http(s.url, "/health", None, timeout_s=min(5.0, self.cfg.health_timeout_s), method="GET")
                s.healthy = True
                return
            except (_ServerDown, SGLangServerError) as e:
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(
            f"SGLang server {s.url} not healthy after rollout.sglang.health_timeout_s="
            f"{self.cfg.health_timeout_s}: {last}" + (_log_tail(s.log_path) if s.log_path else "")
        )

    def _read_context_length(self) -> None:
        """The most prompt + response tokens a request may have, over all servers: SGLang 0.5.x refuses a
        request whose prompt + max_new_tokens reaches the model's context length (``context_length`` of
        /server_info when the server was given --context-length; else its ``max_req_input_len``, the
        scheduler's input limit, below the context and the KV pool). None where a server reports neither."""
        limits: list[int] = []
        for s in self.servers if self._engine is None else [None]:
            info = None
            if s is None:
                get = getattr(self._engine, "get_server_info", None)
                info = get() if get is not None else None
            else:
                for path in ("/server_info", "/get_server_info"):  # 0.5.23; the deprecated route of older ones
                    try:
                        info = self._http(s.url, path, None, min(30.0, self.cfg.request_timeout_s), method="GET")
                        break
                    except SGLangServerError as e:
                        if "HTTP 404" not in str(e):
                            raise
            limit = _context_tokens(info)
            where = "the engine" if s is None else s.url
            if limit is None:
                log.warning("%s reports no context length: requests are not checked against it", where)
                continue
            limits.append(limit)
        self.context_tokens = min(limits) if limits else None
        if self.context_tokens is not None and self.max_response_tokens is not None:
            self._check_response_budget(self.max_response_tokens)

    def _check_response_budget(self, max_response_tokens: int) -> None:
        assert self.context_tokens is not None
        if max_response_tokens + 1 > self.context_tokens:  # a prompt has at least one token
            raise ValueError(
                f"rollout.max_response_tokens={max_response_tokens} does not fit the SGLang servers' context: "
                f"a request may hold at most {self.context_tokens} tokens (prompt + response), so no prompt fits; "
                f"lower rollout.max_response_tokens below {self.context_tokens} or serve a longer --context-length"
            )

    def _stop_proc(self, proc: subprocess.Popen, grace_s: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace_s)

    def shutdown(self) -> None:
        """Stop what we started (only those pids), forget given URLs, end the HTTP calls still in flight
        (their threads then end, so the process can exit), remove temp dirs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_event.set()
        self._transport.close()
        for s in self.servers:
            if s.proc is not None:
                self._stop_proc(s.proc)
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
            self._group = None
        if self._disk_root is not None and self.cfg.disk_dir is None:
            shutil.rmtree(self._disk_root, ignore_errors=True)
        if self._log_dir is not None and self._log_dir_given is None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)

    # ------------------------------------------------------------------ routing and transport
    def _pick(self) -> _Server:
        with self._lock:
            live = [s for s in self.servers if s.healthy and not s.weights_stale]
            if not live:
                raise _ServerDown("no healthy SGLang server with the current weights")
            s = min(live, key=lambda x: x.outstanding)  # least outstanding requests
            s.outstanding += 1
            return s

    def _call(self, path: str, body: dict, timeout_s: float | None = None) -> list:
        """The same control call on every healthy server (engine mode: the in-process engine)."""
        if self._engine is not None:
            return [self._engine_call(path, body)]
        return [
            self._http(s.url, path, body, timeout_s or self.cfg.request_timeout_s)
            for s in self.servers
            if s.healthy
        ]

    def _engine_call(self, path: str, body: dict):
        eng = self._engine
        name = path.strip("/")
        if name == "generate":
            return eng.generate(**body)
        fn = getattr(eng, name, None)
        if fn is None:
            if name in ("begin_weight_update", "end_weight_update"):
                return None  # older Engine without the session calls
            raise RuntimeError(f"sglang.Engine has no {name}()")
        out = fn(**body)
        _check_success(out, name)
        return out

    # ------------------------------------------------------------------ generation
    def _sampling_dict(self, n: int, sampling: SamplingParams) -> dict:
        if sampling.seed is not None and not self._warned_seed:
            log.warning(
                "SGLangRolloutEngine: sampling.seed is not sent to SGLang (runs are not reproducible)"
            )
            self._warned_seed = True
        return {
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_response_tokens,
            "stop_token_ids": list(sampling.stop_token_ids),
            "skip_special_tokens": False,
            "no_stop_trim": True,  # keep the stop token (it is in the ids either way; this keeps text consistent)
        }

    @staticmethod
    def _parse_output(out: dict, prompt_index: int) -> Sample:
        meta = out["meta_info"]
        entries = meta.get("output_token_logprobs") or []
        # [logprob, token id, text] per token, as JSON gives them (floats and ints): read in C, no Python
        # loop per token (scripts/bench_host_step.py)
        ids = list(map(_SECOND, entries)) if entries else list(out.get("output_ids") or [])
        lps = list(map(_FIRST, entries))
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type", "length") if isinstance(fr, dict) else str(fr)
        return Sample(
            prompt_index=prompt_index,
            response_ids=ids,
            logprobs=lps,
            finish_reason=kind if kind in ("stop", "length", "abort") else "length",
            extra={"weight_version": meta.get("weight_version")},
        )

    def _generate_prompt(self, s: _Server, i: int, prompt: list[int], sp: dict, n: int) -> list[Sample]:
        body = {"input_ids": prompt, "sampling_params": sp, "return_logprob": True, "logprob_start_len": -1}
        epoch = s.epoch
        try:
            resp = self._http(s.url, "/generate", body, self.cfg.request_timeout_s)
        except _ServerDown as e:
            s.fail(epoch, str(e))
            raise
        finally:
            with self._lock:
                s.outstanding -= 1
        outs = resp if isinstance(resp, list) else [resp]
        if len(outs) != n:
            raise SGLangServerError(f"{s.url}/generate returned {len(outs)} outputs for n={n}")
        if not self._aborting.is_set():  # an abort we did not ask for: truncated samples, never trained on
            for o in outs:
                fr = o.get("meta_info", {}).get("finish_reason") if isinstance(o, dict) else None
                if isinstance(fr, dict) and fr.get("type") == "abort":
                    raise _ServerAbort(f"{s.url}/generate: the server aborted the request itself "
                                       f"(finish_reason abort: {fr.get('message', '')!s:.300})")
        return [self._parse_output(o, i) for o in outs]

    def _fit_to_context(self, prompts: list[list[int]], sp: dict) -> tuple[list[dict], int]:
        """Per prompt sampling params whose max_new_tokens fits the servers' context (prompt + response);
        returns them and how many were clamped. A prompt that leaves no room at all is an error."""
        limit = self.context_tokens
        if limit is None:
            return [sp] * len(prompts), 0
        self._check_response_budget(sp["max_new_tokens"])
        out: list[dict] = []
        clamped = 0
        for i, p in enumerate(prompts):
            room = limit - len(p)
            if room < 1:
                raise ValueError(
                    f"SGLangRolloutEngine.generate: prompt {i} has {len(p)} tokens, and the SGLang servers take at "
                    f"most {limit} tokens per request (prompt + response): lower data.max_prompt_tokens"
                )
            if room < sp["max_new_tokens"]:
                out.append({**sp, "max_new_tokens": room})
                clamped += 1
            else:
                out.append(sp)
        if clamped:
            log.info("SGLang: %d of %d prompts are too long for max_new_tokens=%d within the servers' %d tokens: "
                     "their responses are cut to fit (rollout/clamped_requests)", clamped, len(prompts),
                     sp["max_new_tokens"], limit)
        return out, clamped

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt, prompt-major: samples ``i*n .. i*n+n-1`` belong to prompt i. After
        ``abort()``, returns only the prompts that finished (still prompt-major)."""
        if self._closed:
            raise RuntimeError("SGLangRolloutEngine.generate: the engine was shut down")
        prompts = check_generate_args("SGLangRolloutEngine", prompt_ids, n)
        sps, clamped = self._fit_to_context(prompts, self._sampling_dict(n, sampling))
        self.resume_memory()  # whatever was released for training
        self._aborting.clear()
        t0 = time.perf_counter()
        results = {i: _PromptResult() for i in range(len(prompts))}
        self._finished = {}
        retries = 0
        server_aborts = 0
        abort_rounds = 0
        if self._engine is not None:
            outs = self._engine.generate(  # one dict per prompt only where one was clamped
                input_ids=prompts, sampling_params=sps if clamped else sps[0], return_logprob=True,
                logprob_start_len=-1,
            )
            for k, o in enumerate(outs):
                results[k // n].samples.append(self._parse_output(o, k // n))
        else:
            pending = list(results)
            while pending:
                if self._closed:  # shut down from another thread (a signal handler): restart nothing
                    raise RuntimeError("SGLangRolloutEngine.generate: the engine was shut down")
                self._recover()
                for i in pending:
                    results[i].attempts += 1
                failed, aborted = self._run_round(prompts, pending, sps, n, results)
                if not failed or self._aborting.is_set():
                    break
                retries += len(failed)
                server_aborts += len(aborted)
                over = [i for i in failed if results[i].attempts > self.cfg.max_retries]
                if over:
                    what = ("SGLang aborted them itself each time (finish_reason abort, not asked for by this engine)"
                            if all(i in aborted for i in over) else "last error")
                    raise RuntimeError(
                        f"SGLangRolloutEngine.generate: prompts {over} failed {self.cfg.max_retries + 1} times "
                        f"(rollout.sglang.max_retries={self.cfg.max_retries}); {what}: {results[over[0]].last_error}"
                    )
                if aborted:  # the server shed load or is pausing: give it time before the next round
                    abort_rounds += 1
                    delay = self.cfg.retry_backoff_s * 2 ** (abort_rounds - 1)
                    log.warning("SGLang aborted %d request(s) itself (%s); resubmitting in %.1f s", len(aborted),
                                results[aborted[0]].last_error, delay)
                    if self._stop_event.wait(delay):
                        raise RuntimeError("SGLangRolloutEngine.generate: the engine was shut down")
                pending = failed
        samples = [s for i in range(len(prompts)) for s in results[i].samples]
        if self._aborting.is_set():  # keep the prompts whose n samples all finished
            done = [
                i
                for i in results
                if len(results[i].samples) == n
                and all(s.finish_reason != "abort" for s in results[i].samples)
            ]
            samples = [s for i in done for s in results[i].samples]
        elif len(samples) != len(prompts) * n:
            raise RuntimeError(
                f"SGLangRolloutEngine.generate: {len(samples)} samples for {len(prompts)} x {n}"
            )
        self._metrics(samples, time.perf_counter() - t0, retries)
        self.last_metrics["rollout/server_aborts"] = float(server_aborts)
        self.last_metrics["rollout/clamped_requests"] = float(clamped)
        return samples

    def _run_round(self, prompts, pending: list[int], sps: list[dict], n: int, results) -> tuple[list[int], list[int]]:
        """One request per pending prompt; returns the prompts that failed and, of those, the ones the server
        aborted itself."""
        failed: list[int] = []
        aborted: list[int] = []
        workers = min(len(pending), self.cfg.max_concurrent_requests)
        pool = _DaemonPool(workers, "sglang-gen")
        watchdog = _Watchdog(self) if self.cfg.watchdog_interval_s > 0 else None
        futures: dict = {}
        try:
            # all servers picked before any request starts, in prompt order (least outstanding, ties to
            # the first): the assignment does not depend on thread timing
            picks = [(i, self._pick()) for i in pending]
            futures = {pool.submit(self._generate_prompt, s, i, prompts[i], sps[i], n): (i, s) for i, s in picks}
            if watchdog is not None:
                watchdog.start()
            waiting = set(futures)
            while waiting:
                done, waiting = wait(waiting, timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in done:  # record each prompt as it lands (abort() reports them)
                    i = futures[fut][0]
                    try:
                        results[i].samples = fut.result()
                        if all(x.finish_reason != "abort" for x in results[i].samples):
                            with self._lock:
                                self._finished[i] = results[i].samples
                    except (_ServerDown, _ServerAbort) as e:
                        results[i].samples = []  # a resubmission replaces, never adds
                        results[i].last_error = str(e)
                        failed.append(i)
                        if isinstance(e, _ServerAbort):
                            aborted.append(i)
                    except SGLangServerError as e:
                        if not self._aborting.is_set():
                            raise
                        results[i].last_error = str(e)
                # requests to a server the watchdog found hung are given up (resubmitted elsewhere or after
                # its restart); their connections are closed below, so their threads end now
                for fut in [f for f in waiting if not futures[f][1].healthy]:
                    i, s = futures[fut]
                    waiting.discard(fut)
                    results[i].samples, results[i].last_error = [], f"{s.url}: {s.last_error}"
                    failed.append(i)
        finally:
            if watchdog is not None:
                watchdog.stop()
            pool.shutdown()
            # whatever is still in flight was given up (a hung server, or an error above): end those calls,
            # or their threads wait for an answer for up to request_timeout_s
            for url in {s.url for fut, (_, s) in futures.items() if not fut.done()}:
                self._transport.close(url)
        return failed, aborted

    def _metrics(self, samples: list[Sample], elapsed_s: float, retries: int) -> None:
        lens = [len(s.response_ids) for s in samples]
        tokens = sum(lens)
        self.last_metrics = {
            "rollout/tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0,
            "rollout/response_len_mean": tokens / len(lens) if lens else 0.0,
            "rollout/response_len_max": float(max(lens, default=0)),
            "rollout/truncation_rate": (
                sum(s.finish_reason == "length" for s in samples) / len(samples) if samples else 0.0
            ),
            "rollout/retried_requests": float(retries),
            "timing/rollout_s": elapsed_s,
        }

    def abort_snapshot(self) -> dict[int, list[Sample]]:
        """The prompts of the running ``generate`` that finished so far, by prompt index."""
        with self._lock:
            return dict(self._finished)

    def abort(self) -> dict[int, list[Sample]]:
        """Abort every in-flight request (``/abort_request`` with ``abort_all``; in engine mode the
        tokenizer manager's ``abort_request``, run on the engine's event loop, which the blocked
        ``generate`` is driving). The running ``generate`` returns the prompts whose n samples all
        finished; this returns those finished so far, by prompt index (engine mode: {}, as the engine
        hands back nothing before its ``generate`` returns)."""
        self._aborting.set()
        if self._engine is not None:
            eng = self._engine
            eng.loop.call_soon_threadsafe(functools.partial(eng.tokenizer_manager.abort_request, abort_all=True))
            return self.abort_snapshot()
        for s in self.servers:
            if s.healthy:
                try:
                    self._http(s.url, "/abort_request", {"rid": "", "abort_all": True}, timeout_s=30.0)
                except _ServerDown as e:
                    s.fail(s.epoch, str(e))
        return self.abort_snapshot()

    # ------------------------------------------------------------------ faults
    def _recover(self, resync: bool = True) -> None:
        """Bring failed servers back (restart ours, re-check given URLs; when none is healthy, wait up to
        ``restart_wait_s`` for a given one to return), re-sync their weights (unless ``resync`` is False: a
        push to every server follows)."""
        for k, s in enumerate(self.servers):
            if s.healthy:
                continue
            if s.launched:
                log.warning("SGLang server %s failed (%s); restarting", s.url, s.last_error)
                if s.proc is not None:
                    self._stop_proc(s.proc, grace_s=5.0)
                s.restarts += 1
                self._launch(s, k)
                self._wait_healthy(s, proc=s.proc)
                self._came_back(s)
            elif self._answers_health(s):
                self._came_back(s)
            else:
                log.warning("SGLang server %s is down (%s)", s.url, s.last_error)
        if not any(s.healthy for s in self.servers):
            self._wait_for_given_servers()
        if resync:
            for s in self.servers:
                if s.healthy and s.weights_stale:
                    self._resync(s)

    def _answers_health(self, s: _Server) -> bool:
        try:
            self._http(s.url, "/health", None, timeout_s=min(5.0, self.cfg.request_timeout_s), method="GET")
            return True
        except (_ServerDown, SGLangServerError):
            return False

    @staticmethod
    def _came_back(s: _Server) -> None:
        # a new process (ours, or one someone else restarted) holds the weights it started with, all its
        # memory, and no weight-update session
        s.healthy, s.weights_stale, s.released, s.session_open = True, True, set(), False

    def _wait_for_given_servers(self) -> None:
        """No server is healthy: the given ones (URL mode) may be restarting (a preempted node, an OOM
        restart); wait up to ``restart_wait_s`` for one to answer /health, then raise naming them."""
        given = [s for s in self.servers if not s.launched and not s.healthy]
        wait_s = self.cfg.restart_wait_s
        if given and wait_s > 0:
            log.warning("no SGLang server is healthy; waiting up to %.0f s (rollout.sglang.restart_wait_s) for "
                        "%s to come back", wait_s, ", ".join(s.url for s in given))
            deadline = time.monotonic() + wait_s
            while not self._stop_event.is_set():
                back = [s for s in given if self._answers_health(s)]
                for s in back:
                    log.warning("SGLang server %s is back; re-syncing its weights", s.url)
                    self._came_back(s)
                if back or time.monotonic() >= deadline:
                    break
                self._stop_event.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        if not any(s.healthy for s in self.servers):
            waited = f"; waited rollout.sglang.restart_wait_s={wait_s} s for one to come back" if given else ""
            raise RuntimeError(
                "SGLangRolloutEngine: no SGLang server is healthy: "
                + "; ".join(f"{s.url}: {s.last_error}" for s in self.servers)
                + waited
            )

    def _resync(self, s: _Server) -> None:
        if self._last_disk_dir is not None:
            resp = self._http(
                s.url,
                "/update_weights_from_disk",
                {"model_path": str(self._last_disk_dir)},
                self.cfg.request_timeout_s,
            )
            _check_success(resp, f"{s.url}/update_weights_from_disk")
        elif not self._synced:
            pass  # never synced: the server runs the weights it started with
        elif self.weights_source is not None:
            self._push(self.weights_source(), only=[s])
        else:
            raise RolloutNeedsWeights(
                f"SGLangRolloutEngine: {s.url} came back without the last weights, and weight_sync="
                f"{self.cfg.weight_sync!r} keeps no copy: stream them with resync_stale() (or pass "
                "weights_source= to build_sglang_engine)"
            )
        self._http(s.url, "/flush_cache", {}, self.cfg.request_timeout_s)
        s.weights_stale = False

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Push HF-named tensors (streamed) to every server, flush its cache, then probe."""
        t0 = time.perf_counter()
        if self._engine is None:
            self._recover(resync=False)  # the push below brings a restarted server up to date too
        self.resume_memory(["weights"])  # the KV cache and CUDA graphs come back after the push
        try:
            self._push(named_tensors, only=None)
        except _ServerDown as e:
            # the stream is spent and every server may hold part of it: all of them need the weights again
            if self._engine is not None:
                raise RuntimeError(f"SGLangRolloutEngine.update_weights: the engine failed during the push ({e})") from e
            for s in self.servers:
                s.weights_stale = True
            self._synced = True
            if self._last_disk_dir is None and self.weights_source is None:
                # no copy here: the next generate raises RolloutNeedsWeights, and the caller re-streams them
                log.warning("SGLang server failed during the weight push (%s); the weights must be pushed "
                            "again (resync_stale) before the next generate", e)
                self.last_metrics["timing/weight_sync_s"] = time.perf_counter() - t0
                self.last_metrics.pop("rollout/probe_logprob_diff_max", None)
                return
            log.warning("SGLang server failed during the weight push (%s); recovering", e)
            self._recover()
        except SGLangServerError as e:
            # refused (success false, HTTP 4xx) part way: a server may hold some of the new tensors. The
            # session is closed (_update_session), so the next push can begin one; until then no server is
            # given a request (a restored copy or RolloutNeedsWeights first, as after a restart)
            for s in self.servers:
                s.weights_stale = True
            self._synced = True
            raise SGLangServerError(
                f"SGLangRolloutEngine.update_weights: {e}; the weight-update session was closed and every server "
                "waits for the weights again (the next update_weights or resync_stale pushes them)"
            ) from e
        else:
            for s in self.servers:
                if s.healthy:
                    s.weights_stale = False
        self._synced = True
        self.resume_memory()
        self._call("/flush_cache", {})
        self.last_metrics["timing/weight_sync_s"] = time.perf_counter() - t0
        if self.cfg.probe and self.trainer_logprob_fn is not None:
            self.last_metrics["rollout/probe_logprob_diff_max"] = self.probe()

    def resync_stale(self, named_tensors: Iterable[tuple[str, Tensor]]) -> list[str]:
        """Push ``named_tensors`` (the weights last given to ``update_weights``) to the servers that came
        back without them (after ``generate`` raised ``RolloutNeedsWeights``), flush their caches, and
        return their URLs; [] when none is waiting (the stream is then not read)."""
        stale = [s for s in self.servers if s.healthy and s.weights_stale]
        if not stale:
            return []
        t0 = time.perf_counter()
        self._push(named_tensors, only=stale)
        for s in stale:
            self._http(s.url, "/flush_cache", {}, self.cfg.request_timeout_s)
            s.weights_stale = False
        self.last_metrics["timing/weight_resync_s"] = time.perf_counter() - t0
        return [s.url for s in stale]

    def _push(self, named_tensors: Iterable[tuple[str, Tensor]], only: list[_Server] | None) -> None:
        mode = self.cfg.weight_sync
        if mode == "disk":
            path = self._save_disk(named_tensors)
            self._post_each(only, "/update_weights_from_disk", {"model_path": str(path)})
        elif mode == "tensor":
            with self._update_session(only):
                for bucket in bucket_named_tensors(named_tensors, self.cfg.bucket_bytes):
                    if self._engine is not None:
                        self._engine_call(
                            "/update_weights_from_tensor", {"named_tensors": bucket, "flush_cache": False}
                        )
                        continue
                    from sglang.srt.utils import MultiprocessingSerializer  # CUDA IPC handles: same node only

                    blob = MultiprocessingSerializer.serialize(bucket, output_str=True)
                    body = {"serialized_named_tensors": [blob] * self.cfg.tp_size, "flush_cache": False}
                    self._post_each(only, "/update_weights_from_tensor", body)
        else:
            self._push_distributed(named_tensors, only)

    def _targets(self, only: list[_Server] | None) -> list[_Server]:
        return only if only is not None else [x for x in self.servers if x.healthy]

    def _post_each(self, only: list[_Server] | None, path: str, body: dict) -> None:
        if self._engine is not None:
            self._engine_call(path, body)
            return
        for s in self._targets(only):
            try:
                resp = self._http(s.url, path, body, self.cfg.request_timeout_s)
            except _ServerDown as e:
                s.fail(s.epoch, str(e))
                raise
            _check_success(resp, f"{s.url}{path}")

    @contextlib.contextmanager
    def _update_session(self, only: list[_Server] | None) -> Iterator[None]:
        """``/begin_weight_update`` ... ``/end_weight_update`` (SGLang >= 0.5.23; a 404 means an older server)
        around a tensor or distributed push, closed on every exit: SGLang refuses a second begin while a
        session is open, so one failed push left open would fail every later one. A session of ours whose
        end did not get through (a dropped connection) is ended first."""
        if self._engine is not None:
            self._engine_call("/begin_weight_update", {})
            try:
                yield
            except BaseException:
                try:
                    self._engine_call("/end_weight_update", {})
                except Exception as e:  # noqa: BLE001 (the push's own error is the one to raise)
                    log.warning("SGLang engine: /end_weight_update after a failed push failed too: %s", e)
                raise
            self._engine_call("/end_weight_update", {})
            return
        targets = [s for s in self._targets(only) if self._begin_end_supported.get(s.url) is not False]
        for s in targets:
            if s.session_open:
                self._end_session(s, missing_ok=True)
        opened: list[_Server] = []
        try:
            for s in targets:
                if self._begin_session(s):
                    opened.append(s)
            yield
        except BaseException:
            for s in opened:
                try:
                    self._end_session(s)
                except (_ServerDown, SGLangServerError) as e:  # the push's own error is the one to raise
                    log.warning("%s/end_weight_update after a failed push failed too (ended before the next "
                                "push): %s", s.url, e)
            raise
        for s in opened:
            self._end_session(s)

    def _begin_session(self, s: _Server) -> bool:
        """Open a session on ``s``; False where the server has no sessions (SGLang < 0.5.23)."""
        try:
            _check_success(self._http(s.url, "/begin_weight_update", {}, self.cfg.request_timeout_s),
                           f"{s.url}/begin_weight_update")
        except _ServerDown as e:
            s.fail(s.epoch, str(e))
            raise
        except SGLangServerError as e:
            if "HTTP 404" not in str(e):
                raise
            log.info("%s has no /begin_weight_update (SGLang < 0.5.23): updating without the session", s.url)
            self._begin_end_supported[s.url] = False
            return False
        self._begin_end_supported[s.url] = True
        s.session_open = True
        return True

    def _end_session(self, s: _Server, missing_ok: bool = False) -> None:
        """Close our session on ``s``. ``missing_ok``: a refusal means it has none open (it ended it, or it
        is a new process), which is what was wanted."""
        try:
            _check_success(self._http(s.url, "/end_weight_update", {}, self.cfg.request_timeout_s),
                           f"{s.url}/end_weight_update")
        except _ServerDown as e:
            s.fail(s.epoch, str(e))
            raise
        except SGLangServerError:
            if not missing_ok:
                raise
        s.session_open = False

    def _save_disk(self, named_tensors: Iterable[tuple[str, Tensor]]) -> Path:
        """Write an HF safetensors dir (shards of ~bucket_bytes + index); keep only the newest one."""
        from safetensors.torch import save_file

        if self._disk_root is None:
            root = self.cfg.disk_dir or tempfile.mkdtemp(prefix="tempo_sglang_weights_")
            self._disk_root = Path(root)
            self._disk_root.mkdir(parents=True, exist_ok=True)
        self._disk_version += 1
        out = self._disk_root / f"v{self._disk_version:06d}"
        out.mkdir(parents=True, exist_ok=True)
        weight_map: dict[str, str] = {}
        total = 0
        for k, bucket in enumerate(bucket_named_tensors(named_tensors, self.cfg.bucket_bytes)):
            fname = f"model-{k:05d}.safetensors"
            # clone: tied or sliced tensors share storage, which safetensors refuses to save
            save_file({n: t.detach().to("cpu").contiguous().clone() for n, t in bucket}, str(out / fname))
            for n, t in bucket:
                weight_map[n] = fname
                total += t.numel() * t.element_size()
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
        if self.cfg.model_path and Path(self.cfg.model_path).is_dir():
            for extra in ("config.json", "generation_config.json"):
                src = Path(self.cfg.model_path) / extra
                if src.exists():
                    shutil.copy(src, out / extra)
        previous, self._last_disk_dir = self._last_disk_dir, out
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return out

    def _push_distributed(
        self, named_tensors: Iterable[tuple[str, Tensor]], only: list[_Server] | None
    ) -> None:
        """NCCL broadcast from this process (rank 0) to every server's TP ranks (GPU only)."""
        cfg = self.cfg
        if only is not None and self._group_ready:
            raise RuntimeError("SGLangRolloutEngine: a restarted server cannot rejoin the NCCL weight group")
        if not self._group_ready:
            world = 1 + cfg.tp_size * max(len(self.servers), 1)
            body_for = lambda k: {  # noqa: E731
                "master_address": cfg.group_master_address,
                "master_port": cfg.group_master_port,
                "rank_offset": 1 + k * cfg.tp_size,
                "world_size": world,
                "group_name": "tempo_weight_update",
                "backend": "nccl",
            }
            with ThreadPoolExecutor(max_workers=len(self.servers) + 1) as pool:
                futs = (
                    [
                        pool.submit(
                            self._http, s.url, "/init_weights_update_group", body_for(k), cfg.request_timeout_s
                        )
                        for k, s in enumerate(self.servers)
                    ]
                    if self._engine is None
                    else [pool.submit(self._engine_call, "/init_weights_update_group", body_for(0))]
                )
                self._group = _init_weight_group(cfg.group_master_address, cfg.group_master_port, world)
                for f in futs:
                    _check_success(f.result(), "init_weights_update_group")
            self._group_ready = True
        with self._update_session(only):
            for bucket in bucket_named_tensors(named_tensors, cfg.bucket_bytes):
                body = {
                    "names": [n for n, _ in bucket],
                    "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket],
                    "group_name": "tempo_weight_update",
                    "flush_cache": False,
                }
                with ThreadPoolExecutor(max_workers=len(self.servers) + 1) as pool:
                    fut = pool.submit(self._post_each, only, "/update_weights_from_distributed", body)
                    try:
                        self._broadcast_bucket(bucket)
                    finally:
                        fut.result()  # a refused update is the error to raise

    def _broadcast_bucket(self, bucket: list[tuple[str, Tensor]]) -> None:
        """The bucket's tensors, one NCCL broadcast each from this process (rank 0 of the weight group)."""
        for _, t in bucket:
            torch.distributed.broadcast(t.detach().cuda().contiguous(), src=0, group=self._group)

    def probe(self) -> float:
        """Engine vs trainer log-probs of ``cfg.probe_ids`` on every server; raises RuntimeError past
        ``probe_tolerance``. Returns the max |difference|."""
        if self.trainer_logprob_fn is None:
            raise RuntimeError("SGLangRolloutEngine.probe: no trainer_logprob_fn was given")
        ids = list(self.cfg.probe_ids)
        want = torch.as_tensor(self.trainer_logprob_fn(ids), dtype=torch.float64).flatten()
        if want.numel() != len(ids) - 1:
            raise ValueError(
                f"trainer_logprob_fn returned {want.numel()} log-probs for {len(ids)} ids (want len-1)"
            )
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        worst = 0.0
        for resp in self._call("/generate", body):
            out = resp[0] if isinstance(resp, list) else resp
            entries = out["meta_info"]["input_token_logprobs"]
            got = torch.tensor([e[0] for e in entries[-(len(ids) - 1) :]], dtype=torch.float64)
            diff = float((got - want).abs().max())
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
        if worst > self.cfg.probe_tolerance:
            raise RuntimeError(
                f"SGLang weight-sync probe failed: max |engine - trainer| log-prob = {worst:.4g} on "
                f"{len(ids)} probe tokens, over rollout.sglang.probe_tolerance={self.cfg.probe_tolerance}; "
                "the rollout engine is not running the trainer's weights"
            )
        return worst

    # ------------------------------------------------------------------ memory
    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free GPU memory of every server (``tags`` of ``MEMORY_TAGS``; None = all of them). Each server's
        released tags are tracked, as SGLang does: a tag is released once, resumed only if released (SGLang
        fails the request otherwise), and a restarted server starts with none released."""
        self._memory("/release_memory_occupation", tags, release=True)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back what ``release_memory`` freed (``tags``; None = all). ``generate`` and
        ``update_weights`` do it themselves where they need it."""
        self._memory("/resume_memory_occupation", tags, release=False)

    @property
    def release_during_training(self) -> bool:
        return self.cfg.release_during_training

    def _memory(self, path: str, tags: Sequence[str] | None, *, release: bool) -> None:
        want = list(MEMORY_TAGS if tags is None else tags)
        unknown = [t for t in want if t not in MEMORY_TAGS]
        if unknown:
            raise ValueError(f"SGLangRolloutEngine: unknown memory tags {unknown} (known: {list(MEMORY_TAGS)})")
        holders = [self._engine_memory] if self._engine is not None else [s for s in self.servers if s.healthy]
        for h in holders:
            todo = [t for t in want if (t in h.released) != release]
            if not todo:
                continue
            if self._engine is not None:
                self._engine_call(path, {"tags": todo})
            else:
                for attempt in range(3):  # a release needs an idle server: a health check may still finish
                    try:
                        self._http(h.url, path, {"tags": todo}, self.cfg.request_timeout_s)
                        break
                    except (_ServerDown, SGLangServerError) as e:
                        if attempt == 2:
                            raise SGLangServerError(f"{h.url}{path} {todo} failed 3 times: {e}") from e
                        time.sleep(1.0)
            h.released = (h.released | set(todo)) if release else (h.released - set(todo))

    # ------------------------------------------------------------------ in-process engine
    def _make_inprocess_engine(self):
        try:
            import sglang
        except ImportError as e:
            raise RuntimeError(
                "rollout.sglang.mode=engine needs sglang installed (pip install 'tempo-mega[sglang]')"
            ) from e
        cfg = self.cfg
        kw: dict = {
            "model_path": cfg.model_path,
            "tp_size": cfg.tp_size,
            "disable_cuda_graph": cfg.disable_cuda_graph,
        }
        if cfg.mem_fraction_static is not None:
            kw["mem_fraction_static"] = cfg.mem_fraction_static
        if cfg.chunked_prefill_size is not None:
            kw["chunked_prefill_size"] = cfg.chunked_prefill_size
        if cfg.quantization:
            kw["quantization"] = cfg.quantization
        if cfg.kv_cache_dtype != "auto":
            kw["kv_cache_dtype"] = cfg.kv_cache_dtype
        if cfg.enable_memory_saver:
            kw["enable_memory_saver"] = True
        return sglang.Engine(**kw)


def _init_weight_group(master_address: str, master_port: int, world_size: int):
    """Rank 0 of a process group outside the default world, joined by SGLang's
    ``init_weights_update_group`` (which rendezvous at ``tcp://master_address:master_port``)."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank=0, world_size=world_size)
    )
    pg, _ = _new_process_group_helper(world_size, rank, [], "nccl", store, group_name="tempo_weight_update")
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def build_sglang_engine(
    cfg: SGLangConfig,
    *,
    pad_token_id: int,
    trainer_logprob_fn: Callable[[list[int]], Sequence[float] | Tensor] | None = None,
    weights_source: Callable[[], Iterable[tuple[str, Tensor]]] | None = None,
    log_dir: str | Path | None = None,
    max_response_tokens: int | None = None,
) -> SGLangRolloutEngine:
    """Launch or connect, wait until healthy. ``trainer_logprob_fn(ids) -> [len(ids)-1]`` log-probs of
    ``ids[1:]`` under the trainer's current weights (temperature 1) enables the post-sync probe;
    ``weights_source()`` re-streams the current weights when a restarted server needs them and the sync
    mode keeps no disk copy. ``log_dir``: where launched servers write their logs (the run's output dir;
    None: a temp dir removed at shutdown). ``max_response_tokens`` (rollout.max_response_tokens) is checked
    against the servers' context length at once."""
    return SGLangRolloutEngine(
        cfg, pad_token_id=pad_token_id, trainer_logprob_fn=trainer_logprob_fn, weights_source=weights_source,
        log_dir=log_dir, max_response_tokens=max_response_tokens,
    )
