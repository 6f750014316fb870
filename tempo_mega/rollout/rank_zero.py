"""Rollout for a multi-rank trainer (backend=megatron): one engine, on rank 0, samples for every rank."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from tempo_mega.batch import RolloutBatch
from tempo_mega.rollout.base import RolloutNeedsWeights
from tempo_mega.rollout.samples import broadcast_samples

log = logging.getLogger("tempo_mega")




def probe_logprobs(actor, ids: list[int], pad_token_id: int) -> list[float]:
    """[len(ids) - 1] log-probs of ``ids[1:]``, each after its prefix, under the actor's current weights
    at temperature 1, through the backend seam: ``forward_logprobs`` on a one-row batch (prompt
    ``ids[:1]``, response ``ids[1:]``); a collective on a multi-rank MegatronBackend.

    Temperature 1 because that is what the probe compares against: ``SGLangRolloutEngine.probe`` asks
    each server for the ``input_token_logprobs`` of ``ids`` in a request sent with temperature 1.0 (the
    fake server computes them at temperature 1 whatever the request says). ``forward_logprobs`` divides
    the logits by the temperature the backend was built with (rollout.temperature), and log-probs at
    temperature T cannot be rescaled to temperature 1 from the chosen tokens alone (the normaliser
    changes), so this one forward is asked for temperature 1."""
    batch = RolloutBatch.from_samples([ids[:1]], [ids[1:]], is_labeled=[False], group_ids=[0],
                                      pad_token_id=pad_token_id)
    return actor.forward_logprobs(batch, temperature=1.0)[0, : len(ids) - 1].tolist()


class RankZeroRollout:
    """A rollout engine for backend=megatron, as every rank of the run sees it (a RolloutEngine): one
    engine, on rank 0, samples for the whole run.

    ``build(self)`` makes the engine; it runs on rank 0 alone (it may use ``self._trainer_logprobs`` as the
    engine's probe). Every rank
    - iterates each weight stream it is given to its end: ``MegatronBackend.export_weights`` is a
      collective (TP shards are gathered, PP stages broadcast over the pipeline); rank 0 drains the
      rest of the stream after a failed push too, so that no rank is left waiting in a collective;
    - with ``probe_ids``, computes the probe's trainer log-probs (``probe_logprobs``, a collective
      forward) before each push, which rank 0's engine compares its own against;
    - gets rank 0's samples, metrics and outcome by broadcast (``broadcast_object_list``), so all ranks
      train on the same batch and an error on rank 0 raises on every rank.

    ``weights_dtype``: the engine gets the tensors in this dtype (cast here where megatron.params_dtype
    differs); None passes them as exported.

    The samples travel from rank 0 as flat tensors (``rollout.samples.broadcast_samples``: 33.5M tokens
    at the paper's shape are 270 MB, with no Python work per token), and the process group's timeout
    must cover rank 0's longest generate. In a one-process world it is the engine (plus the
    probe and the cast)."""

    def __init__(self, build, actor, *, pad_token_id: int, weights_dtype: torch.dtype | None = None,
                 probe_ids: list[int] | None = None, max_resyncs: int = 2,
                 weights_device: str | torch.device = "cpu", release_during_training: bool = False):
        import torch.distributed as dist

        up = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
        self.actor, self.pad_token_id, self.weights_dtype = actor, pad_token_id, weights_dtype
        self.probe_ids = list(probe_ids) if probe_ids is not None else None
        self.max_resyncs = max_resyncs
        self.weights_device = weights_device  # the same on every rank: each one exports there
        self._release_during_training = release_during_training  # the same on every rank too
        self.last_metrics: dict[str, float] = {}
        self._want: list[float] | None = None
        self._samples: list | None = None
        self.engine = None
        self._on_rank0(lambda: setattr(self, "engine", build(self)))

    def _trainer_logprobs(self, ids: list[int]) -> list[float]:
        """What ``probe_logprobs`` gave on every rank before this push (rank 0 alone cannot run it)."""
        if self._want is None or list(ids) != self.probe_ids:
            raise RuntimeError("RankZeroRollout: the probe asked for log-probs that were not computed before the push")
        return self._want

    def _cast(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        want = self.weights_dtype
        for name, t in named_tensors:
            yield name, (t.to(want) if want is not None and t.is_floating_point() and t.dtype != want else t)

    def _on_rank0(self, fn):
        """``fn()`` on rank 0; its result, rank 0's metrics and its error (if any) on every rank."""
        import torch.distributed as dist

        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # the other ranks must hear of it, or they wait in the next collective
                error = e
            if self.engine is not None:
                self.last_metrics = dict(self.engine.last_metrics)
        if self.world_size > 1:
            box = [(result, None if error is None else f"{type(error).__name__}: {error}", self.last_metrics)]
            dist.broadcast_object_list(box, src=0)
            result, message, self.last_metrics = box[0]
            if message is not None and error is None:
                raise RuntimeError(f"rollout failed on rank 0: {message}")
        if error is not None:
            raise error
        return result

    def generate(self, prompt_ids, n: int, sampling) -> list:
        """Rank 0's samples on every rank. When rank 0's engine lost the weights (a restarted server that
        it cannot re-sync alone: ``RolloutNeedsWeights``), every rank takes part in exporting them again,
        rank 0 pushes them to what was restarted, and the whole call is generated again (at most
        ``max_resyncs`` times)."""
        def attempt():
            try:
                self._samples = self.engine.generate(prompt_ids, n, sampling)
                return "samples", None  # the samples travel as flat tensors, below
            except RolloutNeedsWeights as e:
                return "needs_weights", str(e)

        resynced: dict[str, float] = {}
        for k in range(self.max_resyncs + 1):
            kind, value = self._on_rank0(attempt)
            if kind == "samples":
                samples, self._samples = broadcast_samples(self._samples if self.rank == 0 else None), None
                self.last_metrics.update(resynced)  # the generate's own metrics replaced the re-sync's
                return samples
            log.warning("rollout: %s; re-sending the weights", value)
            self._push_weights(self.actor.export_weights(device=self.weights_device), "resync_stale")
            keep = ("rollout/probe_logprob_diff_max", "timing/weight_resync_s")
            resynced = {key: self.last_metrics[key] for key in keep if key in self.last_metrics}
            resynced["rollout/weight_resyncs"] = float(k + 1)
        raise RuntimeError(f"rollout: the engine lost its weights again after {self.max_resyncs} re-syncs: {value}")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.probe_ids is not None:
            self._want = probe_logprobs(self.actor, self.probe_ids, self.pad_token_id)
        self._push_weights(named_tensors, "update_weights")

    def _push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], method: str) -> None:
        """Rank 0's ``engine.<method>(stream)``, every rank iterating the stream to its end."""
        stream = self._cast(named_tensors)

        def push() -> None:
            try:
                getattr(self.engine, method)(stream)
                if method == "resync_stale" and self.probe_ids is not None:
                    self.engine.last_metrics["rollout/probe_logprob_diff_max"] = self.engine.probe()
            finally:
                for _ in stream:  # the export is a collective: finish it whatever the push did
                    pass

        if self.rank != 0:
            for _ in stream:
                pass
        self._on_rank0(push)

    @property
    def release_during_training(self) -> bool:
        return self._release_during_training

    def release_memory(self, tags=None) -> None:
        # tags only where given: the HF engine's methods take none; an error reaches every rank
        self._on_rank0(lambda: self.engine.release_memory(*([] if tags is None else [tags])))

    def resume_memory(self, tags=None) -> None:
        self._on_rank0(lambda: self.engine.resume_memory(*([] if tags is None else [tags])))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class RankZeroSGLang(RankZeroRollout):
    """SGLang for backend=megatron: rank 0 drives the servers (launch, generate, weight push, probe).

    SGLang gets the tensors in ``weights_dtype`` (model.dtype: what the torch backend exports, bf16 in
    the Qwen3 presets). The process group's timeout must also cover rank 0's server launch. With world
    size > 1 and tensor sync, a restarted server is re-synced by every rank exporting the weights again
    (``RankZeroRollout.generate``); disk sync re-syncs from its last copy; distributed (NCCL) sync cannot
    take a restarted server back into its weight group, which is an error."""

    def __init__(self, cfg, actor, *, pad_token_id: int, weights_dtype: torch.dtype, **engine_kw):
        from tempo_mega.rollout.sglang import build_sglang_engine, sync_device

        def build(me: RankZeroRollout):
            source = (lambda: me._cast(actor.export_weights(device=me.weights_device))) if me.world_size == 1 else None
            return build_sglang_engine(cfg, pad_token_id=pad_token_id, weights_source=source,
                                       trainer_logprob_fn=me._trainer_logprobs if cfg.probe else None, **engine_kw)

        super().__init__(build, actor, pad_token_id=pad_token_id, weights_dtype=weights_dtype,
                         probe_ids=list(cfg.probe_ids) if cfg.probe else None, max_resyncs=cfg.max_retries,
                         weights_device=sync_device(cfg), release_during_training=cfg.release_during_training)
