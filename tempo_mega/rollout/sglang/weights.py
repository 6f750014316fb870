"""Weight sync of ``SGLangRolloutEngine`` (``_WeightSync``, a mixin: the state is the engine's): the push
of HF-named tensors by disk, tensor (``/update_weights_from_tensor``) or distributed NCCL broadcast, each
inside a ``/begin_weight_update`` ... ``/end_weight_update`` session, the re-push to servers that came
back (``resync_stale``) and the log-probs the caller probes them with (``prompt_logprobs``).
``bucket_named_tensors`` groups the stream; ``_init_weight_group`` is this process's side of SGLang's
weight-update process group."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from tempo_mega.rollout.sglang.handles import _Server
from tempo_mega.rollout.sglang.transport import (
    SGLangServerError,
    _check_success,
    _NoSuchRoute,
    _ServerDown,
)

log = logging.getLogger(__name__)


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
            if self._last_disk_dir is None:
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
        mode = self.cfg.weight_sync
        if mode == "disk":
            path = self._save_disk(named_tensors)
            self._post_each(only, "/update_weights_from_disk", {"model_path": str(path)})
        elif mode == "tensor":
            with self._update_session(only):
                targets = self._targets(only)
                for bucket in bucket_named_tensors(named_tensors, self.cfg.bucket_bytes):
                    if targets:  # one kind of server per engine: the body is made once, for all of them
                        body = targets[0].tensor_update_body(bucket, self.cfg.tp_size)
                        self._post_each(only, "/update_weights_from_tensor", body)
        else:
            self._push_distributed(named_tensors, only)

    def _targets(self, only: list[_Server] | None) -> list[_Server]:
        return only if only is not None else [x for x in self.servers if x.healthy]

    def _post_each(self, only: list[_Server] | None, path: str, body: dict) -> None:
        for s in self._targets(only):
            try:
                resp = s.call(path, body, self.cfg.request_timeout_s)
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
            _check_success(s.call("/begin_weight_update", {}, self.cfg.request_timeout_s),
                           f"{s.url}/begin_weight_update")
        except _ServerDown as e:
            s.fail(s.epoch, str(e))
            raise
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
            _check_success(s.call("/end_weight_update", {}, self.cfg.request_timeout_s),
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
                futs = [pool.submit(s.call, "/init_weights_update_group", body_for(k), cfg.request_timeout_s)
                        for k, s in enumerate(self.servers)]
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

    def prompt_logprobs(self, ids: Sequence[int]) -> list[list[float]]:
        """Each server's log-probs of ``ids[1:]`` (``input_token_logprobs`` of a request at temperature 1),
        for the caller's post-sync probe."""
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
