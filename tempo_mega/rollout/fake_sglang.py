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

What SGLang 0.5.23 enforces, the fake does too: ``/begin_weight_update`` while a session is open and
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
``GET /fake/stats`` reports request counts and the most generate requests seen in flight at once.
``request_fields`` (in process only: ``{path: field names}``, e.g. read from SGLang's own ``io_struct`` by
the contract test) makes a POST body with a key outside its path's fields an HTTP 400, as SGLang's
request structs refuse unknown fields; ``sampling_params`` keys are checked against the ``"sampling_params"``
entry the same way. ``GET /fake/stats`` also lists the refusals (``unknown_fields``).

    python -m tempo_mega.rollout.fake_sglang --model-path DIR --host 127.0.0.1 --port 30000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tempo_mega.rollout.sglang import MEMORY_TAGS  # SGLang's GPU_MEMORY_ALL_TYPES (0.5.x)

__all__ = ["FakeSGLangServer", "FakeTensorSerializer", "install_fake_serializer", "main", "uninstall_fake_serializer"]


class _FakeState:
    def __init__(
        self,
        model_path: str,
        *,
        slow_s: float = 0.0,
        crash_after_requests: int | None = None,
        crash_once_file: str | None = None,
        hang: bool = False,
        in_process: bool = True,
        abort_requests: int = 0,
        fail_updates: int = 0,
        context_length: int | None = None,
        api_key: str | None = None,
        request_fields: dict[str, list[str] | set[str] | tuple[str, ...]] | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.model_path = model_path
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.model_lock = threading.Lock()  # weights swap vs forward
        self.stats_lock = threading.Lock()
        self.slow_s = slow_s
        self.crash_after_requests = crash_after_requests
        self.crash_once_file = crash_once_file
        self.hang = hang
        self.in_process = in_process
        self.abort_requests = abort_requests
        self.fail_updates = fail_updates
        self.api_key = api_key
        self.request_fields = {k: frozenset(v) for k, v in (request_fields or {}).items()}
        self.unknown_fields: list[str] = []  # "path: key" of each refused body key
        self.context_length_arg = context_length  # --context-length; /server_info reports it as given
        self.context_len = context_length or int(self.model.config.max_position_embeddings)
        self.session_open = False  # a /begin_weight_update not yet ended
        self.unhang = threading.Event()
        self.abort_event = threading.Event()
        self.released: set[str] = set()  # memory tags released, as SGLang's scheduler tracks them
        self.weight_version = "default"
        self.generate_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ model
    @torch.inference_mode()
    def _logprobs_all(self, ids: list[int], temperature: float) -> torch.Tensor:
        """[L, V] float32: log_softmax(logits / temperature) after each prefix."""
        with self.model_lock:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits / temperature, dim=-1)

    def generate_one(
        self, ids: list[int], sp: dict, j: int, return_logprob: bool, logprob_start_len: int
    ) -> dict:
        from tempo_mega.rollout.base import SamplingParams
        from tempo_mega.rollout.hf import sample_from_logits

        temperature = float(sp.get("temperature", 1.0))
        max_new = int(sp.get("max_new_tokens", 128))
        stop_ids = set(sp.get("stop_token_ids") or [])
        sampling = SamplingParams(
            temperature=max(temperature, 1e-5),
            top_p=float(sp.get("top_p", 1.0)),
            top_k=int(sp.get("top_k", -1)),
        )
        digest = hashlib.sha256(json.dumps([ids, j, sp.get("sampling_seed")]).encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        seq = list(ids)
        out_ids: list[int] = []
        out_lps: list[float] = []
        finish = {"type": "length", "length": max_new}
        for _ in range(max_new):
            if self.abort_event.is_set():
                finish = {"type": "abort", "message": "Abort in waiting queue", "status_code": 200}
                break
            with torch.inference_mode(), self.model_lock:
                logits = self.model(input_ids=torch.tensor([seq])).logits[:, -1].float()
            u = torch.rand(1, generator=gen, dtype=torch.float64)
            tok, lp = sample_from_logits(logits, sampling, u)
            t = int(tok[0])
            seq.append(t)
            out_ids.append(t)
            out_lps.append(float(lp[0]))
            if t in stop_ids:
                finish = {"type": "stop", "matched": t}
                break
        meta: dict = {
            "id": "",
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(out_ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(out_lps, out_ids)]
            start = max(logprob_start_len, 0) if logprob_start_len != -1 else len(ids)
            if start < len(ids):
                full = self._logprobs_all(ids, 1.0)
                entries = []
                for pos in range(start, len(ids)):
                    lp = None if pos == 0 else float(full[pos - 1, ids[pos]])
                    entries.append([lp, ids[pos], None])
                meta["input_token_logprobs"] = entries
            else:
                meta["input_token_logprobs"] = []
        return {"text": "", "output_ids": out_ids, "meta_info": meta}

    def load_from_disk(self, model_path: str) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_path}")
        self.load_tensors([item for f in files for item in load_file(str(f)).items()])
        self.model_path = model_path

    def load_tensors(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Replace the named weights (all checked before any is written)."""
        targets = self.model.state_dict()
        for name, t in named_tensors:
            if name not in targets:
                raise ValueError(f"unknown tensor {name!r}")
            if tuple(t.shape) != tuple(targets[name].shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(targets[name].shape)}"
                )
        with self.model_lock, torch.no_grad():
            for name, t in named_tensors:
                targets[name].copy_(t.to(targets[name].dtype))


class FakeTensorSerializer:
    """Stands in for ``sglang.srt.utils.MultiprocessingSerializer`` on a machine without SGLang: the same
    ``serialize(obj, output_str=...)`` / ``deserialize(data)`` calls, with the tensors' bytes in the payload
    (SGLang's own passes CUDA IPC handles, which only a GPU has). ``install_fake_serializer`` puts it where
    the client imports it from, so the fake server's ``/update_weights_from_tensor`` can be exercised."""

    @staticmethod
    def serialize(obj, output_str: bool = False):
        import base64
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        return base64.b64encode(buf.getvalue()).decode() if output_str else buf.getvalue()

    @staticmethod
    def deserialize(data):
        import base64
        import io

        raw = base64.b64decode(data) if isinstance(data, str) else data
        return torch.load(io.BytesIO(raw), weights_only=True)


_FAKE_MODULES = ("sglang", "sglang.srt", "sglang.srt.utils")


def install_fake_serializer() -> list[str]:
    """Make ``from sglang.srt.utils import MultiprocessingSerializer`` give ``FakeTensorSerializer`` in this
    process (only where SGLang itself is not installed: tests of the tensor sync path on CPU). Returns the
    ``sys.modules`` names it added (``uninstall_fake_serializer`` removes them)."""
    import importlib.util
    import sys
    import types

    if "sglang" not in sys.modules and importlib.util.find_spec("sglang") is not None:
        raise RuntimeError("install_fake_serializer: sglang is installed here; test against it instead")
    added = [name for name in _FAKE_MODULES if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["sglang.srt.utils"].MultiprocessingSerializer = FakeTensorSerializer
    return added


def uninstall_fake_serializer(added: list[str]) -> None:
    import sys

    for name in added:
        sys.modules.pop(name, None)


class _Handler(BaseHTTPRequestHandler):
    server: _FakeHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else {}

    def _send(self, status: int, payload, content_type: str = "application/json") -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _unknown_fields(self, path: str, body) -> list[str]:
        fields = self.server.state.request_fields
        if path not in fields or not isinstance(body, dict):
            return []
        bad = [k for k in body if k not in fields[path]]
        sp = body.get("sampling_params")
        if "sampling_params" in fields:
            for one in sp if isinstance(sp, list) else [sp] if isinstance(sp, dict) else []:
                bad += [f"sampling_params.{k}" for k in one if k not in fields["sampling_params"]]
        return bad

    def _error(self, message: str, status: int = 400) -> None:
        self._send(status, {"error": {"message": message}})

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def _route(self, method: str) -> None:
        st = self.server.state
        path = self.path.split("?")[0].rstrip("/") or "/"
        body = self._body() if method == "POST" else {}
        with st.stats_lock:
            st.counts[path] = st.counts.get(path, 0) + 1
        # SGLang's add_api_key_middleware: /health* and /metrics are open, the rest wants the key
        open_route = path.startswith(("/health", "/metrics", "/fake/"))
        if st.api_key and not open_route and self.headers.get("Authorization") != f"Bearer {st.api_key}":
            with st.stats_lock:
                st.counts["unauthorized"] = st.counts.get("unauthorized", 0) + 1
            return self._send(401, {"error": "Unauthorized"})
        unknown = self._unknown_fields(path, body) if method == "POST" else []
        if unknown:
            with st.stats_lock:
                st.unknown_fields += [f"{path}: {k}" for k in unknown]
            return self._error(f"{path}: unknown field(s) {', '.join(unknown)} (fake: SGLang's request fields)")
        try:
            if path in ("/health", "/health_generate"):
                # SGLang answers 503 when its scheduler has produced nothing for 20 s (HEALTH_CHECK_TIMEOUT)
                hung = st.hang and st.in_flight > 0
                self._send(503 if hung else 200, "")
            elif path in ("/model_info", "/get_model_info"):
                self._send(
                    200,
                    {
                        "model_path": st.model_path,
                        "tokenizer_path": st.model_path,
                        "is_generation": True,
                        "weight_version": st.weight_version,
                    },
                )
            elif path in ("/server_info", "/get_server_info"):
                # SGLang: server_args (context_length as given, else null) + the scheduler's limits
                max_req_len = st.context_len - 1
                self._send(200, {"model_path": st.model_path, "context_length": st.context_length_arg,
                                 "max_total_num_tokens": 1 << 20, "max_req_input_len": max_req_len - 5,
                                 "version": "0.5.23 (fake)"})
            elif path == "/generate":
                self._generate(body)
            elif path == "/flush_cache":
                self._send(
                    200,
                    "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)\n",
                    "text/plain",
                )
            elif path.startswith("/update_weights") and "weights" in st.released:
                return self._error("the weights are released (resume them first)")
            elif path == "/update_weights_from_disk":
                if "model_path" not in body:
                    return self._error("model_path is required")
                st.load_from_disk(body["model_path"])
                if body.get("weight_version") is not None:
                    st.weight_version = body["weight_version"]
                self._send(
                    200,
                    {
                        "success": True,
                        "message": "Succeeded to update model weights.",
                        "num_paused_requests": 0,
                    },
                )
            elif path in ("/update_weights_from_tensor", "/update_weights_from_distributed"):
                if not st.session_open:  # 0.5.23: tensor and distributed updates only inside a session
                    return self._send(400, {"success": False, "message": "no weight-update session is open "
                                            "(call /begin_weight_update first)"})
                if st.fail_updates > 0:
                    st.fail_updates -= 1
                    return self._send(400, {"success": False, "message": "Failed to update weights (fake fault)"})
                if path == "/update_weights_from_distributed":  # the tensors come over NCCL: none here
                    return self._send(200, {"success": True, "message": "Succeeded to update model weights."})
                # one payload per TP rank of the server, all the same bucket: load the first
                blobs = body.get("serialized_named_tensors")
                if not blobs:
                    return self._error("serialized_named_tensors is required")
                st.load_tensors(list(FakeTensorSerializer.deserialize(blobs[0])))
                self._send(200, {"success": True, "message": "Succeeded to update model weights."})
            elif path == "/init_weights_update_group":
                self._send(200, {"success": True, "message": "Succeeded to initialize custom process group."})
            elif path == "/begin_weight_update":
                if st.session_open:
                    return self._send(400, {"success": False, "message": "a weight-update session is already open"})
                st.session_open = True
                self._send(200, {"success": True, "message": ""})
            elif path == "/end_weight_update":
                if not st.session_open:
                    return self._send(400, {"success": False, "message": "no weight-update session is open"})
                st.session_open = False
                self._send(200, {"success": True, "message": ""})
            elif path == "/release_memory_occupation":
                st.released |= set(body.get("tags") or MEMORY_TAGS)
                self._send(200, "")
            elif path == "/resume_memory_occupation":
                tags = set(body.get("tags") or MEMORY_TAGS)
                if not tags <= st.released:  # SGLang's set.remove raises: the request fails
                    return self._error(f"resume of tags that are not released: {sorted(tags - st.released)}", 500)
                st.released -= tags
                self._send(200, "")
            elif path == "/abort_request":
                if body.get("abort_all"):
                    st.abort_event.set()
                    st.unhang.set()  # aborted requests stop waiting
                self._send(200, "")
            elif path == "/fake/stats":
                with st.stats_lock:
                    self._send(
                        200,
                        {
                            "generate_requests": st.generate_requests,
                            "max_in_flight": st.max_in_flight,
                            "counts": dict(st.counts),
                            "released": sorted(st.released),
                            "session_open": st.session_open,
                            "unknown_fields": list(st.unknown_fields),
                            "pid": os.getpid(),
                        },
                    )
            elif path == "/fake/config":
                for key in ("slow_s", "crash_after_requests", "hang", "abort_requests", "fail_updates"):
                    if key in body:
                        setattr(st, key, body[key])
                if not st.hang:
                    st.unhang.set()
                if body.get("clear_abort"):
                    st.abort_event.clear()
                self._send(200, {"success": True})
            else:
                self._error(f"not found: {path}", 404)
        except (ValueError, FileNotFoundError, KeyError) as e:
            self._send(400, {"success": False, "message": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _generate(self, body: dict) -> None:
        st = self.server.state
        with st.stats_lock:
            st.generate_requests += 1
            count = st.generate_requests
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            if st.crash_after_requests is not None and count > st.crash_after_requests:
                once = st.crash_once_file
                if once is None or not os.path.exists(once):
                    if once is not None:
                        Path(once).touch()
                    if not st.in_process:
                        os._exit(17)  # a crash: no response, every connection reset
                    self.close_connection = True
                    return
            if st.hang:
                st.unhang.wait(timeout=60.0)
            if st.slow_s:
                time.sleep(st.slow_s)
            if st.released:
                return self._error("memory is released (call /resume_memory_occupation)")
            ids = body.get("input_ids")
            if ids is None:
                return self._error("the fake server takes input_ids only (no text)")
            batch = ids if ids and isinstance(ids[0], list) else [ids]
            sps = body.get("sampling_params") or {}
            sps = sps if isinstance(sps, list) else [sps] * len(batch)
            rl = body.get("return_logprob") or False
            lsl = body.get("logprob_start_len")
            lsl = -1 if lsl is None else lsl
            for i, p in enumerate(batch):
                if not p or min(p) < 0 or max(p) >= st.vocab_size:
                    return self._error(f"input_ids of prompt {i} empty or outside the vocabulary")
                total = len(p) + int(sps[i].get("max_new_tokens", 128))
                if total >= st.context_len:  # SGLang's tokenizer manager refuses these
                    return self._error(f"Requested token count exceeds the model's maximum context length of "
                                       f"{st.context_len} tokens. You requested a total of {total} tokens")
            with st.stats_lock:
                abort = st.abort_requests > 0
                st.abort_requests -= int(abort)
            outs = []
            for i, p in enumerate(batch):
                sp = sps[i]
                if abort:  # SGLang cut it short itself: a truncated answer, HTTP 200
                    sp = {**sp, "max_new_tokens": 1}
                for j in range(int(sp.get("n", 1))):
                    out = st.generate_one(p, sp, j, rl, lsl)
                    if abort:
                        out["meta_info"]["finish_reason"] = {"type": "abort", "message": "Abort before prefill "
                                                             "(fake: generation paused)", "status_code": 200}
                    outs.append(out)
            single = not (ids and isinstance(ids[0], list))
            self._send(200, outs[0] if single and len(outs) == 1 else outs)
        finally:
            with st.stats_lock:
                st.in_flight -= 1


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, state: _FakeState):
        super().__init__(addr, _Handler)
        self.state = state


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
    )
    httpd = _FakeHTTPServer((args.host, args.port), state)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
