"""A small fake SGLang HTTP server for CPU tests of the SGLang client (test support, not product code).

It answers the endpoints ``SGLangRolloutEngine`` uses with the request and response shapes of SGLang's
``srt/entrypoints/http_server.py`` / ``srt/managers/io_struct.py`` (0.5.x): ``/generate`` (``input_ids``
single or batch, ``sampling_params`` one dict or one per prompt, ``n`` > 1 prompt-major,
``return_logprob``, ``logprob_start_len``; log-probs as ``[logprob, token_id, null]`` entries in
``meta_info``; ``finish_reason`` ``{"type": "stop"|"length"|"abort", ...}``), ``/update_weights_from_disk``,
``/update_weights_from_tensor`` (payloads of ``FakeTensorSerializer``, see ``install_fake_serializer``),
``/begin_weight_update`` / ``/end_weight_update``, ``/flush_cache``, ``/health``, ``/health_generate``,
``/model_info`` (and the deprecated ``/get_model_info``), ``/release_memory_occupation``,
``/resume_memory_occupation``, ``/abort_request``. Errors are HTTP 400 with ``{"error": {"message": ...}}``.

Tokens come from a real (tiny) causal LM loaded from ``--model-path`` with transformers, so a weight update
really changes the outputs and the client's probe compares against true trainer log-probs. Sampling is
deterministic: sample ``j`` of a prompt draws its uniforms from a generator seeded by (prompt ids, j).

``/init_weights_update_group`` and ``/destroy_weights_update_group`` keep the process's weight groups
(one per name: a second init of a name is a 400, and so are a destroy of a group it is not in and a
distributed update outside one). What SGLang 0.5.23 enforces, the fake does too: ``/begin_weight_update`` while a session is open and
``/end_weight_update`` without one are HTTP 400, and so are tensor and distributed updates outside a session;
a request whose prompt + ``max_new_tokens`` reaches the context length is a 400 (``/server_info`` reports
``context_length`` when ``--context-length`` was given, else ``max_req_input_len``, as SGLang's does); with
``--api-key`` every route but ``/health*`` (and the fake's own ``/fake/*``) wants ``Authorization: Bearer``.

Fault knobs (command line, or ``POST /fake/config`` in process): ``slow_s`` (sleep per generate request,
so requests overlap), ``crash_after_requests`` (the process exits hard when generate request N+1 arrives;
with ``crash_once_file`` only the first process to get there crashes, so a restarted server behaves),
``hang`` (generate requests block, and ``/health`` answers 503 while one is blocked, as SGLang's
does when its scheduler makes no progress), ``abort_requests`` (the next N generate requests are answered
HTTP 200 with ``finish_reason`` abort, as SGLang answers a request it aborts itself), ``fail_updates``
(the next N tensor/distributed updates answer ``success: false``, HTTP 400). ``FakeSGLangServer.restart``
takes an in-process server down and brings a fresh one (the weights it started with) up on the same port.
``token_latency_s`` and ``max_running`` (benchmarks) replace the model's forward by a latency model: a
request holds one of ``max_running`` slots for ``max_new_tokens x token_latency_s`` and returns that many
tokens drawn from (prompt ids, j). ``GET /fake/stats`` reports request counts and the most generate requests seen in flight at once.
``request_fields`` (in process only: ``{path: field names}``, e.g. read from SGLang's own ``io_struct`` by
the contract test) makes a POST body with a key outside its path's fields an HTTP 400, as SGLang's
request structs refuse unknown fields; ``sampling_params`` keys are checked against the ``"sampling_params"``
entry the same way. ``GET /fake/stats`` also lists the refusals (``unknown_fields``).

    python -m support.fake_sglang --model-path DIR --host 127.0.0.1 --port 30000
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from support.fake_sglang.handler import _FakeHTTPServer
from support.fake_sglang.state import (
    FakeTensorSerializer,
    _FakeState,
    install_fake_serializer,
    uninstall_fake_serializer,
)

__all__ = ["FakeSGLangServer", "FakeTensorSerializer", "install_fake_serializer", "main", "uninstall_fake_serializer"]


class FakeSGLangServer:
    """In-process fake on 127.0.0.1 (port 0 = any free port). ``start()`` returns the base URL."""

    def __init__(self, model_path: str, *, host: str = "127.0.0.1", port: int = 0, **knobs) -> None:
        self.state = _FakeState(model_path, in_process=True, **knobs)
        self._model_path = model_path  # what a restart loads (a disk update repoints state.model_path)
        self._httpd = _FakeHTTPServer((host, port), self.state)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        self.state.unhang.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def restart(self, down_s: float, **knobs) -> threading.Thread:
        """Go away now (every connection refused), and after ``down_s`` come back on the same port as a new
        server: the weights it started with, no session, nothing released (as a restarted SGLang). Runs in
        the background; returns the thread that brings it back."""
        host, port = self._httpd.server_address[:2]
        self.stop()

        def back() -> None:
            time.sleep(down_s)
            self.state = _FakeState(self._model_path, in_process=True, **knobs)
            self._httpd = _FakeHTTPServer((host, port), self.state)
            self.start()

        th = threading.Thread(target=back, daemon=True)
        th.start()
        return th


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="fake SGLang server (tests only)")
    p.add_argument("--model-path", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--slow-s", type=float, default=0.0)
    p.add_argument("--crash-after-requests", type=int, default=None)
    p.add_argument("--crash-once-file", default=None)
    p.add_argument("--hang", action="store_true")
    p.add_argument("--abort-requests", type=int, default=0)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--enable-return-routed-experts", action="store_true")
    p.add_argument("--token-latency-s", type=float, default=0.0)
    p.add_argument("--max-running", type=int, default=0)
    args, _unknown = p.parse_known_args(argv)  # SGLang's own flags (--tp-size, ...) are accepted and ignored
    torch.set_num_threads(1)
    state = _FakeState(
        args.model_path,
        slow_s=args.slow_s,
        crash_after_requests=args.crash_after_requests,
        crash_once_file=args.crash_once_file,
        hang=args.hang,
        in_process=False,
        abort_requests=args.abort_requests,
        context_length=args.context_length,
        api_key=args.api_key,
        return_routed_experts=args.enable_return_routed_experts,
        token_latency_s=args.token_latency_s,
        max_running=args.max_running,
    )
    httpd = _FakeHTTPServer((args.host, args.port), state)
    httpd.serve_forever()
