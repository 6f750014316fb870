"""The fake server's HTTP side: ``_Handler`` answers SGLang's routes with its request and response shapes
(and refuses what SGLang refuses); ``_FakeHTTPServer`` holds the state it serves."""

from __future__ import annotations

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from support.fake_sglang.state import FakeTensorSerializer, _FakeState
from tempo_mega.rollout.sglang.config import MEMORY_TAGS  # SGLang's GPU_MEMORY_ALL_TYPES (0.5.x)


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
        if path in st.missing_routes:
            return self._error(f"not found: {path}", 404)
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
                # 0.5.23: tensor and distributed updates only inside a session (an older server has none)
                if not st.session_open and "/begin_weight_update" not in st.missing_routes:
                    return self._send(400, {"success": False, "message": "no weight-update session is open "
                                            "(call /begin_weight_update first)"})
                if st.fail_updates > 0:
                    st.fail_updates -= 1
                    return self._send(400, {"success": False, "message": "Failed to update weights (fake fault)"})
                if path == "/update_weights_from_distributed":  # the tensors come over NCCL: none here
                    if body.get("group_name", "weight_update_group") not in st.weight_groups:
                        return self._send(400, {"success": False, "message": "not in the weight-update group "
                                                f"{body.get('group_name')!r} (init_weights_update_group first)"})
                    return self._send(200, {"success": True, "message": "Succeeded to update model weights."})
                # one payload per TP rank of the server, all the same bucket: load the first
                blobs = body.get("serialized_named_tensors")
                if not blobs:
                    return self._error("serialized_named_tensors is required")
                st.load_tensors(list(FakeTensorSerializer.deserialize(blobs[0])))
                self._send(200, {"success": True, "message": "Succeeded to update model weights."})
            elif path == "/init_weights_update_group":
                name = body.get("group_name", "weight_update_group")
                if name in st.weight_groups:  # a process holds one group of a name: leave it first
                    return self._send(400, {"success": False, "message": f"group {name} already exists"})
                st.weight_groups[name] = dict(body)
                self._send(200, {"success": True, "message": "Succeeded to initialize custom process group."})
            elif path == "/destroy_weights_update_group":
                name = body.get("group_name", "weight_update_group")
                if st.weight_groups.pop(name, None) is None:
                    return self._send(400, {"success": False, "message": "The group to be destroyed does not exist."})
                self._send(200, {"success": True, "message": "Succeeded to destroy custom process group."})
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
                            "weight_groups": {k: v.get("master_port") for k, v in st.weight_groups.items()},
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
            rre = bool(body.get("return_routed_experts"))
            if rre and not st.return_routed_experts:
                return self._error("return_routed_experts needs a server launched with --enable-return-routed-experts")
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
            if st.token_latency_s > 0:  # the latency model: a slot for max_new_tokens x token_latency_s
                if st.slots is not None:
                    st.slots.acquire()
                try:
                    time.sleep(max(int(sp.get("max_new_tokens", 128)) for sp in sps) * st.token_latency_s)
                finally:
                    if st.slots is not None:
                        st.slots.release()
                outs = [st.timed_one(p, sps[i], j) for i, p in enumerate(batch) for j in range(int(sps[i].get("n", 1)))]
                single = not (ids and isinstance(ids[0], list))
                return self._send(200, outs[0] if single and len(outs) == 1 else outs)
            outs = []
            for i, p in enumerate(batch):
                sp = sps[i]
                if abort:  # SGLang cut it short itself: a truncated answer, HTTP 200
                    sp = {**sp, "max_new_tokens": 1}
                for j in range(int(sp.get("n", 1))):
                    out = st.generate_one(p, sp, j, rl, lsl, rre)
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
    # the listen backlog (socketserver's default is 5): more concurrent connections than that would wait
    # for a SYN retransmit (about 1 s); SGLang's server (uvicorn) takes 2048
    request_queue_size = 2048

    def __init__(self, addr, state: _FakeState):
        super().__init__(addr, _Handler)
        self.state = state
