"""The SGLang servers of an engine (handles in ``handles.py``): the watchdog that finds a hung one
(``_Watchdog``) and ``_ServerFleet``, the part of ``SGLangRolloutEngine`` that launches or connects to the
servers, restarts or waits for failed ones and gives them the last weights back (``_recover``), releases
and resumes their GPU memory, and builds the in-process ``sglang.Engine``. ``redact_command`` hides
secrets in logged command lines; ``server_process_kwargs`` starts a server so that this checkout's
folders never shadow installed packages."""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tempo_mega.rollout.base import RolloutNeedsWeights
from tempo_mega.rollout.sglang.config import MEMORY_TAGS
from tempo_mega.rollout.sglang.handles import _InProcessServer, _Server
from tempo_mega.rollout.sglang.transport import SGLangServerError, _ServerDown

if TYPE_CHECKING:
    from tempo_mega.rollout.sglang.engine import SGLangRolloutEngine

log = logging.getLogger(__name__)


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
                    s.call("/health_generate", None, cfg.watchdog_timeout_s, method="GET")
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


class _ServerFleet:
    """Server lifecycle, faults and memory of ``SGLangRolloutEngine`` (a mixin: the state is the engine's)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        cfg = self.cfg
        if cfg.mode == "engine":
            self.servers = [_InProcessServer(url="engine", engine=self._make_inprocess_engine())]
        elif cfg.urls:
            self.servers = [_Server(url=u.rstrip("/"), transport=self._transport) for u in cfg.urls]
            for s in self.servers:
                self._wait_healthy(s, proc=None)
        else:
            self._check_launch_module()
            for k in range(cfg.num_engines):
                port = cfg.base_port + k
                s = _Server(url=f"http://{cfg.host}:{port}", transport=self._transport, port=port)
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
        if cfg.return_routed_experts:
            cmd += ["--enable-return-routed-experts"]
        if cfg.ep_size > 1:
            cmd += ["--ep-size", str(cfg.ep_size)]
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
                s.call("/health", None, min(5.0, self.cfg.health_timeout_s), method="GET")
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
        for s in self.servers:
            limit = _context_tokens(s.server_info(min(30.0, self.cfg.request_timeout_s)))
            where = "the engine" if not s.routed else s.url
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

    def shutdown(self) -> None:
        """Stop what we started (only those pids), forget given URLs, end the HTTP calls still in flight
        (their threads then end, so the process can exit), remove temp dirs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_event.set()
        self._transport.close()
        for s in self.servers:
            s.stop()
        self._weights.close()
        if self._log_dir is not None and self._log_dir_given is None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        atexit.unregister(self.shutdown)

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
                s.stop(grace_s=5.0)
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
            s.call("/health", None, min(5.0, self.cfg.request_timeout_s), method="GET")
            return True
        except (_ServerDown, SGLangServerError):
            return False

    @staticmethod
    def _came_back(s: _Server) -> None:
        # a new process (ours, or one someone else restarted) holds the weights it started with, all its
        # memory, and no weight-update session
        s.healthy, s.weights_stale, s.released, s.session_open = True, True, set(), False
        s.incarnation += 1

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
        if self._weights.has_copy:
            self._weights.restore(s)
        elif not self._synced:
            pass  # never synced: the server runs the weights it started with
        else:
            raise RolloutNeedsWeights(
                f"SGLangRolloutEngine: {s.url} came back without the last weights, and weight_sync="
                f"{self.cfg.weight_sync!r} keeps no copy: stream them with resync_stale()"
            )
        s.call("/flush_cache", {}, self.cfg.request_timeout_s)
        s.weights_stale = False

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
        for h in [s for s in self.servers if s.healthy]:
            todo = [t for t in want if (t in h.released) != release]
            if not todo:
                continue
            for attempt in range(3 if h.routed else 1):  # an HTTP release needs an idle server: a health
                try:                                     # check may still finish
                    h.call(path, {"tags": todo}, self.cfg.request_timeout_s)
                    break
                except (_ServerDown, SGLangServerError) as e:
                    if attempt == 2:
                        raise SGLangServerError(f"{h.url}{path} {todo} failed 3 times: {e}") from e
                    if not h.routed:
                        raise
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
        if cfg.return_routed_experts:
            kw["enable_return_routed_experts"] = True
        if cfg.ep_size > 1:
            kw["ep_size"] = cfg.ep_size
        return sglang.Engine(**kw)
