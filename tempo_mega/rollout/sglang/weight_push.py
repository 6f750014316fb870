"""How HF-named tensors reach SGLang's servers, one class per transport (``rollout.sglang.weight_sync``):

- ``DiskPush`` (``disk``): an HF safetensors dir (shards of ~``bucket_bytes``), loaded with
  ``/update_weights_from_disk``. It keeps the newest copy, so a restarted server is given the weights
  again without the trainer (``has_copy``, ``restore``).
- ``TensorPush`` (``tensor``): buckets through ``/update_weights_from_tensor`` (CUDA IPC handles for an
  HTTP server on this node, the tensors themselves for the in-process engine: the handle makes the body),
  inside a ``/begin_weight_update`` ... ``/end_weight_update`` session.
- ``NcclPush`` (``distributed``): an NCCL weight-update group with every server's TP ranks
  (``/init_weights_update_group`` once), then per bucket ``/update_weights_from_distributed`` and one
  broadcast per tensor from this process (rank 0 of the group), inside a session.

A push is given the engine (its servers, its ``_post_each`` and ``_update_session``) and the servers to
push to (None: every healthy one). ``WEIGHT_PUSH`` maps the config's name to the class.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tempo_mega.rollout.sglang.config import SGLangConfig
from tempo_mega.rollout.sglang.handles import _Server
from tempo_mega.rollout.sglang.transport import _check_success

if TYPE_CHECKING:
    from tempo_mega.rollout.sglang.engine import SGLangRolloutEngine

log = logging.getLogger(__name__)

GROUP_NAME = "tempo_weight_update"


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
    pg, _ = _new_process_group_helper(world_size, rank, [], "nccl", store, group_name=GROUP_NAME)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _destroy_weight_group(pg) -> None:
    torch.distributed.destroy_process_group(pg)


class WeightPush:
    """One transport of the weights to the servers. ``has_copy``: whether it can give a restarted server
    the last weights itself (``restore``); otherwise the caller streams them again (``resync_stale``)."""

    name = ""

    def __init__(self, cfg: SGLangConfig):
        self.cfg = cfg

    @property
    def has_copy(self) -> bool:
        return False

    def push(self, eng: SGLangRolloutEngine, named_tensors: Iterable[tuple[str, Tensor]],
             only: list[_Server] | None) -> None:
        raise NotImplementedError

    def restore(self, s: _Server) -> None:
        raise RuntimeError(f"weight_sync={self.name!r} keeps no copy of the weights")

    def close(self) -> None:
        """Free what the transport holds (a temp dir, a process group). Idempotent."""


class DiskPush(WeightPush):
    name = "disk"

    def __init__(self, cfg: SGLangConfig):
        super().__init__(cfg)
        self.root: Path | None = None
        self.last_dir: Path | None = None
        self.version = 0

    @property
    def has_copy(self) -> bool:
        return self.last_dir is not None

    def push(self, eng, named_tensors, only) -> None:
        path = self.save(named_tensors)
        eng._post_each(only, "/update_weights_from_disk", {"model_path": str(path)})

    def restore(self, s: _Server) -> None:
        assert self.last_dir is not None
        resp = s.call("/update_weights_from_disk", {"model_path": str(self.last_dir)}, self.cfg.request_timeout_s)
        _check_success(resp, f"{s.url}/update_weights_from_disk")

    def save(self, named_tensors: Iterable[tuple[str, Tensor]]) -> Path:
        """Write an HF safetensors dir (shards of ~bucket_bytes + index); keep only the newest one."""
        from safetensors.torch import save_file

        if self.root is None:
            self.root = Path(self.cfg.disk_dir or tempfile.mkdtemp(prefix="tempo_sglang_weights_"))
            self.root.mkdir(parents=True, exist_ok=True)
        self.version += 1
        out = self.root / f"v{self.version:06d}"
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
        previous, self.last_dir = self.last_dir, out
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return out

    def close(self) -> None:
        if self.root is not None and self.cfg.disk_dir is None:  # a temp dir of ours (a given one stays)
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = self.last_dir = None


class TensorPush(WeightPush):
    name = "tensor"

    def push(self, eng, named_tensors, only) -> None:
        with eng._update_session(only):
            targets = eng._targets(only)
            for bucket in bucket_named_tensors(named_tensors, self.cfg.bucket_bytes):
                if targets:  # one kind of server per engine: the body is made once, for all of them
                    body = targets[0].tensor_update_body(bucket, self.cfg.tp_size)
                    eng._post_each(only, "/update_weights_from_tensor", body)


class NcclPush(WeightPush):
    """NCCL broadcast from this process (rank 0 of a group outside the trainer's world) to every server's TP
    ranks. An NCCL group cannot take a new member: when a server comes back as a new process (restarted,
    or a given URL that went away), the group is made again with every healthy server (the survivors
    leave the old one: ``/destroy_weights_update_group``), at ``group_master_port + k`` for the k-th group,
    and the push goes to all of them (a broadcast reaches every member)."""

    name = "distributed"

    def __init__(self, cfg: SGLangConfig):
        super().__init__(cfg)
        self.group = None
        self.ready = False
        self.groups_made = 0
        self._members: dict[str, int] = {}  # url -> the incarnation of the server process in the group

    def push(self, eng, named_tensors, only) -> None:
        cfg = self.cfg
        healthy = [s for s in eng.servers if s.healthy]
        if not self.ready:
            self.join(healthy)
        elif any(self._members.get(s.url) != s.incarnation for s in healthy):
            self.rejoin(healthy)
            only = None  # every member of the new group takes the broadcast
        with eng._update_session(only):
            for bucket in bucket_named_tensors(named_tensors, cfg.bucket_bytes):
                body = {
                    "names": [n for n, _ in bucket],
                    "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                    "shapes": [list(t.shape) for _, t in bucket],
                    "group_name": GROUP_NAME,
                    "flush_cache": False,
                }
                with ThreadPoolExecutor(max_workers=len(eng.servers) + 1) as pool:
                    fut = pool.submit(eng._post_each, only, "/update_weights_from_distributed", body)
                    try:
                        self.broadcast_bucket(bucket)
                    finally:
                        fut.result()  # a refused update is the error to raise

    def join(self, servers: list[_Server]) -> None:
        """The weight-update group: every server's TP ranks join it (``/init_weights_update_group``)
        while this process does (rank 0)."""
        cfg = self.cfg
        world = 1 + cfg.tp_size * max(len(servers), 1)
        port = cfg.group_master_port + self.groups_made

        def body_for(k: int) -> dict:
            return {"master_address": cfg.group_master_address, "master_port": port,
                    "rank_offset": 1 + k * cfg.tp_size, "world_size": world, "group_name": GROUP_NAME,
                    "backend": "nccl"}

        with ThreadPoolExecutor(max_workers=len(servers) + 1) as pool:
            futs = [pool.submit(s.call, "/init_weights_update_group", body_for(k), cfg.request_timeout_s)
                    for k, s in enumerate(servers)]
            self.group = _init_weight_group(cfg.group_master_address, port, world)
            for f in futs:
                _check_success(f.result(), "init_weights_update_group")
        self.groups_made += 1
        self._members = {s.url: s.incarnation for s in servers}
        self.ready = True

    def rejoin(self, servers: list[_Server]) -> None:
        """A new group of ``servers``: the survivors of the old one leave it, this process too, then
        ``join``."""
        back = [s.url for s in servers if self._members.get(s.url) != s.incarnation]
        log.warning("SGLang %s came back as new processes: the NCCL weight group is made again with %d servers",
                    ", ".join(back), len(servers))
        for s in servers:
            if self._members.get(s.url) == s.incarnation:  # a member of the old group: leave it
                resp = s.call("/destroy_weights_update_group", {"group_name": GROUP_NAME}, self.cfg.request_timeout_s)
                _check_success(resp, f"{s.url}/destroy_weights_update_group")
        self.close()
        self.ready = False
        self.join(servers)

    def broadcast_bucket(self, bucket: list[tuple[str, Tensor]]) -> None:
        """The bucket's tensors, one NCCL broadcast each from this process (rank 0 of the weight group)."""
        for _, t in bucket:
            torch.distributed.broadcast(t.detach().cuda().contiguous(), src=0, group=self.group)

    def close(self) -> None:
        if self.group is not None:
            _destroy_weight_group(self.group)
            self.group = None


WEIGHT_PUSH: dict[str, type[WeightPush]] = {c.name: c for c in (DiskPush, TensorPush, NcclPush)}
