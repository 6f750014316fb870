"""Rollout for a multi-rank trainer (backend=megatron): one engine, on rank 0, samples for every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from tempo_mega.rollout.base import RolloutNeedsWeights
from tempo_mega.rollout.samples import broadcast_samples


class RankZeroRollout:
    """A rollout engine for backend=megatron, as every rank of the run sees it (a RolloutEngine): one
    engine, on rank 0, samples for the whole run. It is told things and asked things, as any engine; it
    holds no model of the trainer's.

    ``build()`` makes the engine; it runs on rank 0 alone. Every rank
    - iterates each weight stream it is given (``update_weights``, ``resync_stale``) to its end:
      ``MegatronBackend.export_weights`` is a collective (TP shards are gathered, PP stages broadcast
      over the pipeline); rank 0 drains the rest of the stream after a failed push too, so that no rank
      is left waiting in a collective;
    - gets rank 0's samples, probe log-probs, metrics and outcome by broadcast (``broadcast_object_list``),
      so all ranks train on the same batch and an error on rank 0 raises on every rank, as the same type
      where the caller acts on it (``RolloutNeedsWeights``: every rank exports the weights again).

    ``weights_dtype``: the engine gets the tensors in this dtype (cast here where megatron.params_dtype
    differs); None passes them as exported. ``weights_device``, ``release_during_training``,
    ``probe_ids``, ``probe_tolerance`` and ``max_resyncs`` are the engine's, given on every rank.

    The samples travel from rank 0 as flat tensors (``rollout.samples.broadcast_samples``: 33.5M tokens
    at the paper's shape are 270 MB, with no Python work per token), and the process group's timeout
    must cover rank 0's longest generate. In a one-process world it is the engine (plus the cast)."""

    def __init__(self, build: Callable[[], object], *, weights_dtype: torch.dtype | None = None,
                 weights_device: str | torch.device = "cpu", release_during_training: bool = False,
                 probe_ids: Sequence[int] | None = None, probe_tolerance: float = 0.0, max_resyncs: int = 0):
        import torch.distributed as dist

        up = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
        self.weights_dtype = weights_dtype
        self.weights_device = weights_device  # the same on every rank: each one exports there
        self.release_during_training = release_during_training  # the same on every rank too
        self.probe_ids = tuple(probe_ids) if probe_ids is not None else None
        self.probe_tolerance, self.max_resyncs = probe_tolerance, max_resyncs
        self._samples: list | None = None
        self.engine = None
        self._on_rank0(lambda: setattr(self, "engine", build()))

    def _cast(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        want = self.weights_dtype
        for name, t in named_tensors:
            yield name, (t.to(want) if want is not None and t.is_floating_point() and t.dtype != want else t)

    def _on_rank0(self, fn):
        """``fn()`` on rank 0; its result and its error (if any) on every rank."""
        import torch.distributed as dist

        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # the other ranks must hear of it, or they wait in the next collective
                error = e
        if self.world_size > 1:
            message = None if error is None else f"{type(error).__name__}: {error}"
            box = [(result, message, isinstance(error, RolloutNeedsWeights))]
            dist.broadcast_object_list(box, src=0)
            result, message, needs_weights = box[0]
            if message is not None and error is None:
                kind = RolloutNeedsWeights if needs_weights else RuntimeError
                raise kind(f"rollout failed on rank 0: {message}")
        if error is not None:
            raise error
        return result

    def generate(self, prompt_ids, n: int, sampling) -> tuple[list, dict[str, float]]:
        """Rank 0's samples and metrics on every rank. ``RolloutNeedsWeights`` on rank 0 (a restarted
        server it cannot restore alone) is raised on every rank: every rank then exports the weights for
        ``resync_stale``."""
        def attempt() -> dict[str, float]:
            self._samples, metrics = self.engine.generate(prompt_ids, n, sampling)  # samples: flat tensors, below
            return metrics

        metrics = self._on_rank0(attempt)
        samples, self._samples = broadcast_samples(self._samples if self.rank == 0 else None), None
        return samples, metrics

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._push_weights(named_tensors, "update_weights")

    def resync_stale(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        return self._push_weights(named_tensors, "resync_stale")

    def prompt_logprobs(self, ids: Sequence[int]) -> list[list[float]]:
        """Rank 0's engine's log-probs of ``ids[1:]`` (one list per server), on every rank."""
        return self._on_rank0(lambda: [[float(x) for x in lp] for lp in self.engine.prompt_logprobs(ids)])

    def _push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], method: str):
        """Rank 0's ``engine.<method>(stream)``, every rank iterating the stream to its end."""
        stream = self._cast(named_tensors)

        def push():
            try:
                return getattr(self.engine, method)(stream)
            finally:
                for _ in stream:  # the export is a collective: finish it whatever the push did
                    pass

        if self.rank != 0:
            for _ in stream:
                pass
        return self._on_rank0(push)

    def release_memory(self, tags=None) -> None:
        # tags only where given: the HF engine's methods take none; an error reaches every rank
        self._on_rank0(lambda: self.engine.release_memory(*([] if tags is None else [tags])))

    def resume_memory(self, tags=None) -> None:
        self._on_rank0(lambda: self.engine.resume_memory(*([] if tags is None else [tags])))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class RankZeroSGLang(RankZeroRollout):
    """SGLang for backend=megatron: rank 0 drives the servers (launch, generate, weight push, probe
    requests).

    SGLang gets the tensors in ``weights_dtype`` (model.dtype: what the torch backend exports, bf16 in
    the Qwen3 presets). The process group's timeout must also cover rank 0's server launch. With tensor
    sync, a restarted server is re-synced by every rank exporting the weights again (the controller's
    ``WeightSync.generate``); disk sync re-syncs from its last copy; distributed (NCCL) sync cannot take a
    restarted server back into its weight group, which is an error."""

    def __init__(self, cfg, *, pad_token_id: int, weights_dtype: torch.dtype, **engine_kw):
        from tempo_mega.rollout.sglang import build_sglang_engine, sync_device

        super().__init__(lambda: build_sglang_engine(cfg, pad_token_id=pad_token_id, **engine_kw),
                         weights_dtype=weights_dtype, weights_device=sync_device(cfg),
                         release_during_training=cfg.release_during_training,
                         probe_ids=cfg.probe_ids if cfg.probe else None, probe_tolerance=cfg.probe_tolerance,
                         max_resyncs=cfg.max_retries)
