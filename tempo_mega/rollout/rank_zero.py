"""Rollout for a multi-rank trainer (backend=megatron): engines owned by the first rank of each node
group sample for every rank. ``RankZeroRollout``: one group, rank 0's engine samples for the run;
``NodeGroupRollout``: one group per node, each node's first rank owns that node's engine, and a step's
prompts are spread over all of them."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from tempo_mega.rollout.base import RolloutNeedsWeights, generation_metrics
from tempo_mega.rollout.samples import broadcast_samples

log = logging.getLogger(__name__)

# what each node's engine counts, summed over the nodes; the rest of its metrics are recomputed over all
# samples (generation_metrics) or kept per node (rollout/node<k>/...)
_SUMMED = ("rollout/retried_requests", "rollout/server_aborts", "rollout/clamped_requests", "rollout/servers_up",
           "rollout/servers")
_PER_NODE = ("rollout/tokens_per_s", "rollout/servers_up")


def split_prompts(count: int, weights: Sequence[int]) -> list[list[int]]:
    """Prompt indices ``0..count-1`` spread over groups in proportion to ``weights`` (their servers): each
    prompt, in order, to the group with the fewest prompts per server so far (ties to the first), so equal
    groups take turns (prompt i to group i mod k) and a group of no servers takes none."""
    if not any(w > 0 for w in weights):
        raise ValueError(f"split_prompts: no group has a server (servers per group: {list(weights)})")
    shares: list[list[int]] = [[] for _ in weights]
    live = [k for k, w in enumerate(weights) if w > 0]
    for i in range(count):
        k = min(live, key=lambda g: (len(shares[g]) / weights[g], g))
        shares[k].append(i)
    return shares


class NodeGroupRollout:
    """A rollout engine for backend=megatron, as every rank of the run sees it (a RolloutEngine): the
    ranks are split into groups (``groups``: the ranks of each, default one per node,
    ``distributed.node_ranks``), and the first rank of each group (its leader) builds and owns the group's
    engine, ``build(k)`` for group k (its servers on that node's GPUs, launched, health-checked and
    restarted there). It is told things and asked things, as any engine; it holds no model of the trainer's.

    - ``generate``: the prompts are spread over the groups in proportion to their servers
      (``split_prompts``); every leader samples its share at once; each leader's samples then reach every
      rank (``rollout.samples.broadcast_samples``, flat tensors), in prompt order. Each group's engine
      routes its share over its own servers (least outstanding requests) and recovers its own failures:
      a group that loses a server restarts it and re-syncs it while the others finish. When a group cannot
      restore the weights alone (``RolloutNeedsWeights``), every rank hears it, exports the weights again
      (``resync_stale``: each leader pushes them to its restarted servers only), and the retried call
      generates only the shares still missing: a share that finished is kept, keyed by the call's prompts.
    - ``update_weights`` / ``resync_stale``: every rank iterates the stream to its end
      (``MegatronBackend.export_weights`` is a collective that leaves the whole tensors on every rank, on
      ``weights_device``), and each leader pushes its own copy to its group's servers (CUDA IPC on the
      node: the weights never pass through one rank's host memory); a leader drains the rest of the
      stream after a failed push too, so that no rank is left waiting in a collective.
    - every leader's outcome reaches every rank (``all_gather_object``): an error on one leader raises on
      every rank, as the same type where the caller acts on it (``RolloutNeedsWeights``).

    ``weights_dtype``: the engines get the tensors in this dtype (cast where megatron.params_dtype
    differs); None passes them as exported. ``weights_device``, ``release_during_training``,
    ``probe_ids``, ``probe_tolerance`` and ``max_resyncs`` are the engines', given on every rank. The
    process group's timeout must cover the longest generate of a leader. With several groups the metrics
    are those of the whole call (``generation_metrics`` over all samples, the counters summed) plus each
    group's ``rollout/node<k>/tokens_per_s`` and ``rollout/node<k>/servers_up``."""

    def __init__(self, build: Callable[[int], object], *, groups: Sequence[Sequence[int]] | None = None,
                 weights_dtype: torch.dtype | None = None, weights_device: str | torch.device = "cpu",
                 release_during_training: bool = False, probe_ids: Sequence[int] | None = None,
                 probe_tolerance: float = 0.0, max_resyncs: int = 0):
        import torch.distributed as dist

        from tempo_mega.distributed import node_ranks

        up = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
        self.groups = [list(g) for g in (groups if groups is not None else node_ranks())]
        if sorted(r for g in self.groups for r in g) != list(range(self.world_size)) or self.groups[0][0] != 0:
            raise ValueError(f"NodeGroupRollout: the groups {self.groups} must hold every rank of the "
                             f"{self.world_size} once, rank 0 leading the first")
        self.leaders = [g[0] for g in self.groups]
        self.group = next(k for k, g in enumerate(self.groups) if self.rank in g)
        self.is_leader = self.rank == self.leaders[self.group]
        self.weights_dtype = weights_dtype
        self.weights_device = weights_device  # the same on every rank: each one exports there
        self.release_during_training = release_during_training  # the same on every rank too
        self.probe_ids = tuple(probe_ids) if probe_ids is not None else None
        self.probe_tolerance, self.max_resyncs = probe_tolerance, max_resyncs
        self._done: tuple | None = None  # (call key, samples, metrics) of this leader's finished share
        self.engine = None

        def make():
            self.engine = build(self.group)
            return len(getattr(self.engine, "servers", None) or [None])

        self.servers_per_group = self._on_leaders(make)

    # ------------------------------------------------------------------ collectives
    def _on_leaders(self, fn) -> list:
        """``fn()`` on every leader; the results (one per group, in group order) on every rank, and any
        leader's error raised on every rank (the leader's own error where it failed)."""
        import torch.distributed as dist

        result, error = None, None
        if self.is_leader:
            try:
                result = fn()
            except Exception as e:  # the other ranks must hear of it, or they wait in the next collective
                error = e
        if self.world_size == 1:
            if error is not None:
                raise error
            return [result]
        mine = (result, None if error is None else f"{type(error).__name__}: {error}",
                isinstance(error, RolloutNeedsWeights))
        box: list = [None] * self.world_size
        dist.all_gather_object(box, mine if self.is_leader else None)
        outcomes = [box[r] for r in self.leaders]
        failed = [(k, o) for k, o in enumerate(outcomes) if o[1] is not None]
        if not failed:
            return [o[0] for o in outcomes]
        # the same kind on every rank: they must all take the same path next (a re-sync is a collective)
        kind = RolloutNeedsWeights if all(o[2] for _, o in failed) else RuntimeError
        if error is not None and (kind is RolloutNeedsWeights or not isinstance(error, RolloutNeedsWeights)):
            raise error  # this leader's own error, where it takes the path every rank takes
        k, (_, message, _) = failed[0]
        where = f"rank {self.leaders[k]}" + (f" (node {k})" if len(self.groups) > 1 else "")
        raise kind(f"rollout failed on {where}: {message}"
                   + (f"; and on {len(failed) - 1} more node(s)" if len(failed) > 1 else "")) from error
        return [o[0] for o in outcomes]

    def _cast(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        want = self.weights_dtype
        for name, t in named_tensors:
            yield name, (t.to(want) if want is not None and t.is_floating_point() and t.dtype != want else t)

    # ------------------------------------------------------------------ the engine seam
    def generate(self, prompt_ids, n: int, sampling) -> tuple[list, dict[str, float]]:
        """Every group's samples and the metrics of the call on every rank (see the class docstring).
        ``RolloutNeedsWeights`` on a leader (a restarted server it cannot restore alone) is raised on every
        rank: every rank then exports the weights for ``resync_stale``, and the retried call generates the
        missing shares only."""
        t0 = time.perf_counter()
        plan = self._plan(prompt_ids)
        box: dict = {}

        def attempt() -> dict[str, float]:
            box["samples"], metrics = self._local(plan, n, sampling)
            return metrics

        per_group = self._on_leaders(attempt)
        self._done = None
        return self._gather(per_group, box.get("samples"), time.perf_counter() - t0)

    def start_generate(self, calls):
        """``calls`` ((prompt ids, n, sampling) each) sampled in the background (``rollout.background``):
        each leader samples its groups' shares on a thread; the other ranks do nothing until
        ``finish_generate``, which every rank calls (the samples reach every rank there)."""
        from tempo_mega.rollout.background import Background

        jobs = [(self._plan(p), n, sampling) for p, n, sampling in calls]
        bg = Background(lambda job: self._local(*job), jobs) if self.is_leader else None
        return {"bg": bg, "jobs": jobs}

    def finish_generate(self, handle) -> list[tuple[list, dict[str, float]]]:
        """The (samples, metrics) of each call of ``start_generate`` on every rank; a leader's error is
        raised on every rank (``RolloutNeedsWeights`` as such)."""
        bg = handle["bg"]
        try:
            per_group = self._on_leaders(lambda: [m for _, m in bg.result()])
        finally:
            # no share of a background call is kept: the caller samples a failed one again later, with
            # other weights (generate keeps shares across a re-sync of the same weights only)
            self._done = None
        # each call's time: its slowest group's own (the background overlapped other work)
        return [self._gather([calls[k] for calls in per_group], bg.results[k][0] if bg is not None else None,
                             elapsed_s=max(calls[k].get("timing/rollout_s", 0.0) for calls in per_group))
                for k in range(len(handle["jobs"]))]

    def _plan(self, prompt_ids) -> tuple[list[list[int]], list[list[int]]]:
        """The prompts and each group's share of them."""
        prompts = [list(p) for p in prompt_ids]
        if len(self.groups) == 1:
            return prompts, [list(range(len(prompts)))]
        return prompts, split_prompts(len(prompts), self.servers_per_group)

    def _local(self, plan, n: int, sampling) -> tuple[list, dict[str, float]]:
        """On a leader: its group's share of the call, sampled by its engine (a share that finished before
        another group asked for a re-sync is given again, not sampled again)."""
        prompts, shares = plan
        if len(self.groups) == 1:
            return self.engine.generate(prompts, n, sampling)
        key = hashlib.sha1(json.dumps([prompts, n, repr(sampling)]).encode()).hexdigest()
        if self._done is not None and self._done[0] == key:
            return self._done[1], self._done[2]
        self._done = None
        mine = shares[self.group]
        samples, metrics = self.engine.generate([prompts[i] for i in mine], n, sampling) if mine else ([], {})
        for s in samples:  # the group's prompt indices -> the call's
            s.prompt_index = mine[s.prompt_index]
        self._done = (key, samples, metrics)
        return samples, metrics

    def _gather(self, per_group: list[dict], mine: list | None, elapsed_s: float) -> tuple[list, dict[str, float]]:
        """Each leader's samples on every rank, in prompt order, and the call's metrics (over ``elapsed_s``)."""
        samples: list = []
        for leader in self.leaders:
            samples += broadcast_samples(mine if self.rank == leader else None, src=leader)
        if len(self.groups) == 1:
            return samples, per_group[0]
        samples.sort(key=lambda s: s.prompt_index)  # stable: a prompt's n samples keep their order
        return samples, self._merged_metrics(per_group, samples, elapsed_s)

    @staticmethod
    def _merged_metrics(per_group: list[dict], samples: list, elapsed_s: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in per_group:  # anything else an engine reports: the largest over the groups
            for name, v in m.items():
                out[name] = max(out.get(name, v), v)
        out.update(generation_metrics(samples, elapsed_s))
        for name in _SUMMED:
            if any(name in m for m in per_group):
                out[name] = float(sum(m.get(name, 0.0) for m in per_group))
        for k, m in enumerate(per_group):
            for name in _PER_NODE:
                if name in m:
                    out[name.replace("rollout/", f"rollout/node{k}/", 1)] = float(m[name])
        return out

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._push_weights(named_tensors, "update_weights")

    def resync_stale(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        return [url for urls in self._push_weights(named_tensors, "resync_stale") for url in (urls or [])]

    def prompt_logprobs(self, ids: Sequence[int]) -> list[list[float]]:
        """Every group's engine's log-probs of ``ids[1:]`` (one list per server, groups in order), on every
        rank."""
        per_group = self._on_leaders(lambda: [[float(x) for x in lp] for lp in self.engine.prompt_logprobs(ids)])
        return [lp for lps in per_group for lp in lps]

    def _push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], method: str) -> list:
        """Each leader's ``engine.<method>(stream)``, every rank iterating the stream to its end."""
        stream = self._cast(named_tensors)

        def push():
            try:
                return getattr(self.engine, method)(stream)
            finally:
                for _ in stream:  # the export is a collective: finish it whatever the push did
                    pass

        if not self.is_leader:
            for _ in stream:
                pass
        return self._on_leaders(push)

    def release_memory(self, tags=None) -> None:
        # tags only where given: the HF engine's methods take none; an error reaches every rank
        self._on_leaders(lambda: self.engine.release_memory(*([] if tags is None else [tags])))

    def resume_memory(self, tags=None) -> None:
        self._on_leaders(lambda: self.engine.resume_memory(*([] if tags is None else [tags])))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class RankZeroRollout(NodeGroupRollout):
    """One engine, on rank 0, samples for the whole run: ``NodeGroupRollout`` with a single group of every
    rank. ``build()`` makes the engine on rank 0 alone. In a one-process world it is the engine (plus the
    cast)."""

    def __init__(self, build: Callable[[], object], **kw):
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        super().__init__(lambda _group: build(), groups=[list(range(world))], **kw)


def _sglang_kw(cfg) -> dict:
    from tempo_mega.rollout.sglang import sync_device

    return {"weights_device": sync_device(cfg), "release_during_training": cfg.release_during_training,
            "probe_ids": cfg.probe_ids if cfg.probe else None, "probe_tolerance": cfg.probe_tolerance,
            "max_resyncs": cfg.max_retries}


class RankZeroSGLang(RankZeroRollout):
    """SGLang for backend=megatron, driven by rank 0 alone (servers given by URL, the in-process engine,
    or ``rollout.sglang.launch_on=rank0``): rank 0 launches or connects, generates, pushes the weights and
    sends the probe requests.

    SGLang gets the tensors in ``weights_dtype`` (model.dtype: what the torch backend exports, bf16 in
    the Qwen3 presets). The process group's timeout must also cover rank 0's server launch. With tensor
    sync, a restarted server is re-synced by every rank exporting the weights again (the controller's
    ``WeightSync.generate``); disk sync re-syncs from its last copy; distributed (NCCL) sync makes its
    weight group again with the restarted server in it."""

    def __init__(self, cfg, *, pad_token_id: int, weights_dtype: torch.dtype, **engine_kw):
        from tempo_mega.rollout.sglang import build_sglang_engine

        super().__init__(lambda: build_sglang_engine(cfg, pad_token_id=pad_token_id, **engine_kw),
                         weights_dtype=weights_dtype, **_sglang_kw(cfg))


class NodeGroupSGLang(NodeGroupRollout):
    """SGLang servers on every node of a multi-rank trainer (``rollout.sglang.launch_on=every_node``): the
    first rank of node j launches ``num_engines`` servers on that node's GPUs (ports ``base_port +
    j*num_engines + k``, logs under ``log_dir/node<j>``), owns their pids, restarts them, and pushes the
    weights to them from its own copy (CUDA IPC with tensor sync); a step's prompts are spread over every
    node's servers (``NodeGroupRollout``). One node is ``RankZeroSGLang``'s behaviour."""

    def __init__(self, cfg, *, pad_token_id: int, weights_dtype: torch.dtype, groups=None, log_dir=None,
                 **engine_kw):
        import dataclasses
        from pathlib import Path

        from tempo_mega.rollout.sglang import build_sglang_engine

        if cfg.urls or cfg.mode != "server":
            raise ValueError("rollout.sglang.launch_on=every_node: each node launches its own servers; servers "
                             "given by rollout.sglang.urls or mode=engine are driven from rank 0 (launch_on=rank0)")

        def build(node: int):
            mine = dataclasses.replace(cfg, base_port=cfg.base_port + node * cfg.num_engines)
            where = None if log_dir is None else Path(log_dir) / f"node{node}"
            return build_sglang_engine(mine, pad_token_id=pad_token_id, log_dir=where, **engine_kw)

        super().__init__(build, groups=groups, weights_dtype=weights_dtype, **_sglang_kw(cfg))
        if len(self.groups) > 1 and self.is_leader:
            log.info("SGLang on node %d of %d: %d server(s) owned by rank %d", self.group, len(self.groups),
                     self.servers_per_group[self.group], self.rank)
