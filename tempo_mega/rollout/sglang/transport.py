"""JSON over HTTP to SGLang servers: ``_Transport`` (the job's API key, the connections in flight and
closing them), ``_DaemonPool`` (the threads requests run on, never waited for at exit) and the errors a
call ends in: ``SGLangServerError`` (HTTP 4xx, a bad request), ``_ServerDown`` (no answer: a fault) and
``_ServerAbort`` (SGLang aborted the request itself)."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future
from http.client import HTTPException


class SGLangServerError(RuntimeError):
    """A server answered with an error (HTTP 4xx): a bad request, not a fault; never retried."""


class _NoSuchRoute(SGLangServerError):
    """The server has no such route (HTTP 404; an in-process engine: no such method): an older SGLang."""


class _ServerDown(RuntimeError):
    """A server did not answer: timeout, refused/reset connection, HTTP 5xx. Caught and recovered from
    inside the engine; a RuntimeError (naming the URL) where it does surface."""


class _ServerAbort(RuntimeError):
    """A server answered a request with finish_reason abort that this engine did not ask for. The server is
    not at fault (it stays in use); the prompt is resubmitted after a backoff."""

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
        if status == 404:
            raise _NoSuchRoute(f"{url}{path}: HTTP 404: {raw.decode(errors='replace')[:2000]}")
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
