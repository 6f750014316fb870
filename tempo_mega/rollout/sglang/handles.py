"""The handles of an engine's SGLang servers, behind one interface: ``_Server`` (an HTTP server, launched
by us or given by URL) and ``_InProcessServer`` (an in-process ``sglang.Engine``) both answer
``call(path, body, timeout_s)`` with SGLang's route names (``_NoSuchRoute`` where a route is missing),
``server_info()``, ``tensor_update_body(bucket)``, ``abort_all()`` and ``stop()``, and carry the state the
engine tracks per server (health, outstanding requests, released memory tags, stale weights, an open
weight-update session). ``routed`` tells the engine how to generate: one request per prompt routed over
the servers, or the whole call in one (in-process)."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tempo_mega.rollout.sglang.transport import _check_success, _NoSuchRoute, _ServerDown, _Transport


def _stop_proc(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


@dataclass(eq=False)
class _Server:
    """An HTTP SGLang server: its state, and SGLang's routes through the engine's ``transport``."""

    url: str
    transport: _Transport | None = field(default=None, repr=False)
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
    incarnation: int = 0  # +1 each time it comes back as a new process (restarted, or a given URL back)

    # one request per prompt, routed over the servers (False: the whole call in one request, in-process)
    routed = True

    def fail(self, epoch: int, error: str) -> None:
        """Mark it failed, unless it was already marked so since the request of ``epoch`` was sent."""
        if epoch == self.epoch:
            self.healthy, self.last_error, self.epoch = False, error, self.epoch + 1

    @property
    def launched(self) -> bool:
        return self.port is not None

    def call(self, path: str, body: dict | None, timeout_s: float, method: str = "POST") -> Any:
        """SGLang's route ``path`` with the JSON ``body``: the parsed answer. ``_ServerDown`` for a server
        that did not answer, ``SGLangServerError`` for a refusal (``_NoSuchRoute``: it has no such route)."""
        assert self.transport is not None
        return self.transport.call(self.url, path, body, timeout_s, method=method)

    def post(self, path: str, body: dict, timeout_s: float) -> Any:
        """``call``, its answer checked (``_check_success``: a refusal is ``SGLangServerError``); a server
        that did not answer is marked failed before ``_ServerDown`` goes on."""
        try:
            resp = self.call(path, body, timeout_s)
        except _ServerDown as e:
            self.fail(self.epoch, str(e))
            raise
        _check_success(resp, f"{self.url}{path}")
        return resp

    def server_info(self, timeout_s: float) -> dict | None:
        for path in ("/server_info", "/get_server_info"):  # 0.5.23; the deprecated route of older ones
            try:
                return self.call(path, None, timeout_s, method="GET")
            except _NoSuchRoute:
                continue
        return None

    def tensor_update_body(self, bucket: list, tp_size: int) -> dict:
        """``/update_weights_from_tensor``'s body for ``bucket``: serialized, once per TP rank (CUDA IPC
        handles: the server runs on this node)."""
        from sglang.srt.utils import MultiprocessingSerializer

        blob = MultiprocessingSerializer.serialize(bucket, output_str=True)
        return {"serialized_named_tensors": [blob] * tp_size, "flush_cache": False}

    def abort_all(self) -> None:
        try:
            self.call("/abort_request", {"rid": "", "abort_all": True}, 30.0)
        except _ServerDown as e:
            self.fail(self.epoch, str(e))

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop the process if we launched it (a given server is only forgotten)."""
        if self.proc is not None:
            _stop_proc(self.proc, grace_s)


@dataclass(eq=False)
class _InProcessServer(_Server):
    """An in-process ``sglang.Engine`` (``rollout.sglang.mode=engine``) behind the same handle: a route is
    the engine's method of that name, called with the body as keyword arguments. It never fails over
    (no process of ours to restart), and takes a whole ``generate`` in one call."""

    engine: Any = field(default=None, repr=False)
    routed = False

    def call(self, path: str, body: dict | None, timeout_s: float | None = None, method: str = "POST") -> Any:
        name = path.strip("/")
        if name == "generate":
            return self.engine.generate(**(body or {}))
        fn = getattr(self.engine, name, None)
        if fn is None:
            raise _NoSuchRoute(f"sglang.Engine has no {name}()")
        out = fn(**(body or {}))
        _check_success(out, name)
        return out

    def server_info(self, timeout_s: float) -> dict | None:
        get = getattr(self.engine, "get_server_info", None)
        return get() if get is not None else None

    def tensor_update_body(self, bucket: list, tp_size: int) -> dict:
        return {"named_tensors": bucket, "flush_cache": False}  # the tensors themselves: same process

    def abort_all(self) -> None:
        """The tokenizer manager's ``abort_request``, run on the engine's event loop, which the blocked
        ``generate`` is driving (SGLang's ZMQ sockets are not thread-safe)."""
        eng = self.engine
        eng.loop.call_soon_threadsafe(functools.partial(eng.tokenizer_manager.abort_request, abort_all=True))

    def stop(self, grace_s: float = 10.0) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
