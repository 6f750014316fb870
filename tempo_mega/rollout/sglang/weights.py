"""Weight sync of ``SGLangRolloutEngine`` (``_WeightSync``, a mixin: the state is the engine's): the push
of HF-named tensors through the configured transport (``weight_push.py``: disk, tensor or NCCL, the last
two inside a ``/begin_weight_update`` ... ``/end_weight_update`` session), what a failed push leaves
(every server waits for the weights again), the re-push to servers that came back (``resync_stale``) and
the log-probs the caller probes them with (``prompt_logprobs``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence

from torch import Tensor

from tempo_mega.rollout.sglang.handles import _Server
from tempo_mega.rollout.sglang.transport import (
    SGLangServerError,
    _NoSuchRoute,
    _ServerDown,
)

log = logging.getLogger(__name__)


class _WeightSync:
    """Weight sync and the probe log-probs of ``SGLangRolloutEngine`` (a mixin: the state is the engine's)."""

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Push HF-named tensors (streamed) to every server and flush its cache."""
        self._recover(resync=False)  # the push below brings a restarted server up to date too
        self.resume_memory(["weights"])  # the KV cache and CUDA graphs come back after the push
        try:
            self._push(named_tensors, only=None)
        except _ServerDown as e:
            # the stream is spent and every server may hold part of it: all of them need the weights again
            for s in self.servers:
                s.weights_stale = True
            self._synced = True
            if not self._weights.has_copy:
                # no copy here: the next generate raises RolloutNeedsWeights, and the caller re-streams them
                log.warning("SGLang server failed during the weight push (%s); the weights must be pushed "
                            "again (resync_stale) before the next generate", e)
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
        if self.cfg.resume_after_push:
            self.resume_memory()
        self._call("/flush_cache", {})

    def resync_stale(self, named_tensors: Iterable[tuple[str, Tensor]]) -> list[str]:
        """Push ``named_tensors`` (the weights last given to ``update_weights``) to the servers that came
        back without them (after ``generate`` raised ``RolloutNeedsWeights``), flush their caches, and
        return their URLs; [] when none is waiting (the stream is then not read)."""
        stale = [s for s in self.servers if s.healthy and s.weights_stale]
        if not stale:
            return []
        self._push(named_tensors, only=stale)
        for s in stale:
            s.call("/flush_cache", {}, self.cfg.request_timeout_s)
            s.weights_stale = False
        return [s.url for s in stale]

    def _push(self, named_tensors: Iterable[tuple[str, Tensor]], only: list[_Server] | None) -> None:
        self._weights.push(self, named_tensors, only)

    def _targets(self, only: list[_Server] | None) -> list[_Server]:
        return only if only is not None else [x for x in self.servers if x.healthy]

    def _post_each(self, only: list[_Server] | None, path: str, body: dict) -> None:
        for s in self._targets(only):
            s.post(path, body, self.cfg.request_timeout_s)

    @contextlib.contextmanager
    def _update_session(self, only: list[_Server] | None) -> Iterator[None]:
        """``/begin_weight_update`` ... ``/end_weight_update`` (SGLang >= 0.5.23; a 404 means an older server)
        around a tensor or distributed push, closed on every exit: SGLang refuses a second begin while a
        session is open, so one failed push left open would fail every later one. A session of ours whose
        end did not get through (a dropped connection) is ended first."""
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
            s.post("/begin_weight_update", {}, self.cfg.request_timeout_s)
        except _NoSuchRoute:
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
            s.post("/end_weight_update", {}, self.cfg.request_timeout_s)
        except SGLangServerError:
            if not missing_ok:
                raise
        s.session_open = False

    def prompt_logprobs(self, ids: Sequence[int]) -> list[list[float]]:
        """Each server's log-probs of ``ids[1:]`` (``input_token_logprobs`` of a request at temperature 1),
        for the caller's post-sync probe. Takes back whatever memory was released (a request needs the KV cache)."""
        self.resume_memory()
        ids = list(ids)
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        out = []
        for resp in self._call("/generate", body):
            first = resp[0] if isinstance(resp, list) else resp
            entries = first["meta_info"]["input_token_logprobs"]
            out.append([float(e[0]) for e in entries[-(len(ids) - 1):]])
        return out
