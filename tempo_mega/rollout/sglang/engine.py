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

Probe: ``prompt_logprobs(ids)`` asks every server for the ``input_token_logprobs`` of ``ids`` at
temperature 1; the caller compares them with the trainer's after a weight push (``probe_ids``,
``probe_tolerance``: rollout.sglang.probe*).

Log-probs: SGLang returns ``log(probs)`` after temperature and before top-p/top-k truncation (the same
contract as ``Sample.logprobs`` and the HF engine). ``SamplingParams.seed`` is not sent (SGLang's
per-request seed needs deterministic inference mode); this is said once in the log.

Faults: a request that times out, a refused/reset connection or an HTTP 5xx marks its server failed, and
so does a watchdog that, while requests run, checks each busy server's ``/health_generate`` (a hung
server is found in about ``watchdog_interval_s x watchdog_failures``, not after ``request_timeout_s``). A
server we launched is restarted (its pid terminated, then killed), a server given by URL is marked down
until ``/health`` answers again; with disk sync either gets the last weights again (the last disk copy)
before it serves, and the failed prompts are resubmitted, at most ``max_retries`` times each; then a
RuntimeError names the prompts and the last error. Tensor and distributed sync keep no copy: ``generate``
raises ``RolloutNeedsWeights`` and the caller streams the weights with ``resync_stale`` (the engine holds
no closure into the trainer); a server without the current weights is never given a request. When no server is healthy, given ones are
waited for (``restart_wait_s``). A request SGLang aborted itself (finish_reason abort) is resubmitted after
a backoff, never returned. A weight-update session is ended on every exit path. Calls given up (a hung
server) and all calls at ``shutdown`` have their sockets closed, and run on daemon threads, so a failed run
exits at once. Requests are fitted to the servers' context length, read at start.
"""

from __future__ import annotations

import atexit
import base64
import logging
import operator
import os
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from tempo_mega.rollout.base import (
    Sample,
    SamplingParams,
    check_generate_args,
    expert_ids,
    generation_metrics,
)
from tempo_mega.rollout.sglang.config import SGLangConfig, sync_device
from tempo_mega.rollout.sglang.handles import _Server
from tempo_mega.rollout.sglang.servers import _ServerFleet, _Watchdog
from tempo_mega.rollout.sglang.transport import (
    SGLangServerError,
    _DaemonPool,
    _ServerAbort,
    _ServerDown,
    _Transport,
)
from tempo_mega.rollout.sglang.weight_push import WEIGHT_PUSH
from tempo_mega.rollout.sglang.weights import _WeightSync

log = logging.getLogger(__name__)
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


@dataclass
class _PromptResult:
    samples: list[Sample] = field(default_factory=list)
    attempts: int = 0
    last_error: str = ""


class SGLangRolloutEngine(_ServerFleet, _WeightSync):
    """RolloutEngine over SGLang. Build with ``build_sglang_engine``; see the module docstring."""

    def __init__(
        self,
        cfg: SGLangConfig,
        *,
        pad_token_id: int,
        start: bool = True,
        log_dir: str | Path | None = None,
        max_response_tokens: int | None = None,
        moe_shape: tuple[int, int, int] | None = None,
    ) -> None:
        cfg.check_launchable()
        self.cfg = cfg
        self.moe_shape = moe_shape  # (layers, top-k, experts): reads a response's routed experts
        self.pad_token_id = pad_token_id
        self.servers: list[_Server] = []
        self.pids: list[int] = []  # every process we started, for shutdown and for the record
        self._lock = threading.Lock()
        self._aborting = threading.Event()
        self._finished: dict[int, list[Sample]] = {}
        self._weights = WEIGHT_PUSH[cfg.weight_sync](cfg)  # the transport of the weights to the servers
        self._synced = False
        self._begin_end_supported: dict[str, bool] = {}
        self._warned_seed = False
        self._fields: dict = {"return_logprob": True, "logprob_start_len": -1}  # of the generate call in progress
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

    @property
    def probe_ids(self) -> tuple[int, ...] | None:
        return tuple(self.cfg.probe_ids) if self.cfg.probe else None

    @property
    def probe_tolerance(self) -> float:
        return self.cfg.probe_tolerance

    @property
    def max_resyncs(self) -> int:
        return self.cfg.max_retries

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
        return [s.call(path, body, timeout_s or self.cfg.request_timeout_s) for s in self.servers if s.healthy]

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

    def _request_fields(self, sampling: SamplingParams) -> dict:
        """What a /generate body asks besides the prompt and sampling params: log-probs of the response,
        and with ``return_routed_experts`` the experts of every token (SGLang's ``return_routed_experts``;
        its servers must run with ``--enable-return-routed-experts``: rollout.sglang.return_routed_experts)."""
        body: dict = {"return_logprob": True, "logprob_start_len": -1}
        if sampling.return_routed_experts:
            if self.moe_shape is None or not self.cfg.return_routed_experts:
                raise ValueError("SGLangRolloutEngine.generate: return_routed_experts needs a mixture of experts "
                                 "served with rollout.sglang.return_routed_experts=true")
            body["return_routed_experts"] = True
        return body

    @staticmethod
    def _routed_experts(meta: dict, tokens: int, moe_shape: tuple[int, int, int] | None) -> Tensor | None:
        """SGLang's ``meta_info["routed_experts"]`` (base64 of int32 [tokens - 1, layers, top-k], every token
        the server ran but the last) as ``expert_ids``; None when the response has none."""
        raw = meta.get("routed_experts")
        if raw is None or moe_shape is None:
            return None
        if int(meta.get("routed_experts_start_len") or 0):
            raise SGLangServerError("SGLang returned routed experts from routed_experts_start_len="
                                    f"{meta['routed_experts_start_len']}; this engine reads whole sequences only")
        layers, k, experts = moe_shape
        flat = torch.frombuffer(bytearray(base64.b64decode(raw)), dtype=torch.int32)
        if flat.numel() != (tokens - 1) * layers * k:
            raise SGLangServerError(f"SGLang returned {flat.numel()} routed-expert ids for {tokens} tokens; expected "
                                    f"(tokens - 1) x {layers} layers x top-{k} = {(tokens - 1) * layers * k}")
        return expert_ids(flat.view(tokens - 1, layers, k), experts)

    @staticmethod
    def _parse_output(out: dict, prompt_index: int, prompt_len: int = 0,
                      moe_shape: tuple[int, int, int] | None = None) -> Sample:
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
            routed_experts=SGLangRolloutEngine._routed_experts(meta, prompt_len + len(ids), moe_shape)
            if "routed_experts" in meta else None,
        )

    def _generate_prompt(self, s: _Server, i: int, prompt: list[int], sp: dict, n: int) -> list[Sample]:
        body = {"input_ids": prompt, "sampling_params": sp, **self._fields}
        epoch = s.epoch
        try:
            resp = s.call("/generate", body, self.cfg.request_timeout_s)
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
        return [self._parse_output(o, i, len(prompt), self.moe_shape) for o in outs]

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

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> tuple[list[Sample], dict[str, float]]:
        """(samples, metrics): n samples per prompt, prompt-major (samples ``i*n .. i*n+n-1`` belong to
        prompt i; after ``abort()``, only the prompts that finished), and ``generation_metrics`` of the
        call with the fault counters: ``rollout/retried_requests`` (resubmitted after a server failed),
        ``rollout/server_aborts`` (aborted by SGLang itself), ``rollout/clamped_requests`` (max tokens
        cut to the context), and after the call ``rollout/servers_up`` of ``rollout/servers`` (healthy,
        with the current weights)."""
        if self._closed:
            raise RuntimeError("SGLangRolloutEngine.generate: the engine was shut down")
        prompts = check_generate_args("SGLangRolloutEngine", prompt_ids, n)
        sps, clamped = self._fit_to_context(prompts, self._sampling_dict(n, sampling))
        self._fields = self._request_fields(sampling)
        self.resume_memory()  # whatever was released for training
        self._aborting.clear()
        t0 = time.perf_counter()
        results = {i: _PromptResult() for i in range(len(prompts))}
        self._finished = {}
        retries = 0
        server_aborts = 0
        abort_rounds = 0
        if self.servers and not self.servers[0].routed:  # in-process: one call, a dict per prompt where clamped
            outs = self.servers[0].call("/generate", {
                "input_ids": prompts, "sampling_params": sps if clamped else sps[0], **self._fields})
            for k, o in enumerate(outs):
                results[k // n].samples.append(self._parse_output(o, k // n, len(prompts[k // n]), self.moe_shape))
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
        up = sum(s.healthy and not s.weights_stale for s in self.servers)
        return samples, {**generation_metrics(samples, time.perf_counter() - t0),
                         "rollout/retried_requests": float(retries), "rollout/server_aborts": float(server_aborts),
                         "rollout/clamped_requests": float(clamped), "rollout/servers_up": float(up),
                         "rollout/servers": float(len(self.servers))}

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

    def abort_snapshot(self) -> dict[int, list[Sample]]:
        """The prompts of the running ``generate`` that finished so far, by prompt index."""
        with self._lock:
            return dict(self._finished)

    def abort(self) -> dict[int, list[Sample]]:
        """Abort every in-flight request (each server's ``abort_all``: ``/abort_request`` with
        ``abort_all``, or the in-process engine's abort on its own event loop). The running ``generate``
        returns the prompts whose n samples all finished; this returns those finished so far, by prompt
        index (engine mode: {}, as the engine hands back nothing before its ``generate`` returns)."""
        self._aborting.set()
        for s in self.servers:
            if s.healthy:
                s.abort_all()
        return self.abort_snapshot()


def build_sglang_engine(
    cfg: SGLangConfig,
    *,
    pad_token_id: int,
    log_dir: str | Path | None = None,
    max_response_tokens: int | None = None,
    moe_shape: tuple[int, int, int] | None = None,
) -> SGLangRolloutEngine:
    """Launch or connect, wait until healthy. ``log_dir``: where launched servers write their logs (the run's output dir;
    None: a temp dir removed at shutdown). ``max_response_tokens`` (rollout.max_response_tokens) is checked
    against the servers' context length at once. ``moe_shape`` (layers, top-k, experts) of a mixture of
    experts: how a response's routed experts are read."""
    return SGLangRolloutEngine(
        cfg, pad_token_id=pad_token_id, log_dir=log_dir, max_response_tokens=max_response_tokens,
        moe_shape=moe_shape,
    )
