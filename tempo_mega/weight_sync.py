"""The controller's weight-sync phase: the actor's weights into the sampler, and the check that the
sampler now runs them.

Engines are one-way: a rollout engine is told weights (``update_weights``, ``resync_stale``) and asked
for log-probs (``prompt_logprobs``); it holds no model of the trainer's and no closure into it.
``WeightSync`` compares the engine's log-probs of its ``probe_ids`` with the actor's (the post-sync
probe) and, when ``generate`` raises ``RolloutNeedsWeights`` (a restarted server the engine cannot
restore alone: tensor or NCCL sync keeps no copy), streams the weights again and generates again.
Through the seams only, so the same code runs for one process and for a multi-rank Megatron actor
(where the export and the probe forward are collectives every rank takes part in).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch

from tempo_mega.backends.base import TrainBackend
from tempo_mega.batch import RolloutBatch
from tempo_mega.rollout.base import RolloutEngine, RolloutNeedsWeights, Sample, SamplingParams

log = logging.getLogger(__name__)

PROBE_METRIC = "rollout/probe_logprob_diff_max"


def probe_logprobs(actor: TrainBackend, ids: Sequence[int], pad_token_id: int) -> list[float]:
    """[len(ids) - 1] log-probs of ``ids[1:]``, each after its prefix, under the actor's current weights
    at temperature 1, through the backend seam: ``forward_logprobs`` on a one-row batch (prompt
    ``ids[:1]``, response ``ids[1:]``); a collective on a multi-rank MegatronBackend.

    Temperature 1 because that is what engines answer ``prompt_logprobs`` at (SGLang's
    ``input_token_logprobs`` of a request sent with temperature 1.0); log-probs at another temperature
    cannot be rescaled to temperature 1 from the chosen tokens alone (the normaliser changes)."""
    ids = list(ids)
    batch = RolloutBatch.from_samples([ids[:1]], [ids[1:]], is_labeled=[False], group_ids=[0],
                                      pad_token_id=pad_token_id)
    return actor.forward_logprobs(batch, temperature=1.0)[0, : len(ids) - 1].tolist()


class WeightSync:
    """The actor's weights into ``rollout``, checked, and the re-push a restarted server needs.

    ``offload`` (``tempo_mega.offload.TrainerOffload``, trainer.offload_during_rollout): the trainer's
    memory goes to the engine while it generates, so the engine's side of the probe waits for the next
    ``generate`` (the engine takes its KV cache back only then, after the offload): ``push`` computes
    the actor's side at once and ``generate`` compares before sampling. A re-sync during ``generate``
    takes the trainer's memory back for the export and hands it over again."""

    def __init__(self, actor: TrainBackend, rollout: RolloutEngine, pad_token_id: int, offload=None):
        self.actor, self.rollout, self.pad_token_id = actor, rollout, pad_token_id
        self.offload = offload if offload is not None and offload.mode != "none" else None
        self._pending_probe: torch.Tensor | None = None  # the actor's probe log-probs, for the next generate
        self._deferred: dict[str, float] = {}  # what that probe measured, until take_deferred_probe()

    def take_deferred_probe(self) -> dict[str, float]:
        """What the last push's probe measured where its engine side ran at a later ``generate``
        (``offload``), once: {} otherwise."""
        out, self._deferred = self._deferred, {}
        return out

    def export(self):
        """The actor's HF-named weights, streamed, exported where the engine takes them."""
        return self.actor.export_weights(device=self.rollout.weights_device)

    def push(self) -> dict[str, float]:
        """``update_weights`` with the actor's weights, then the probe; returns what the probe measured (the
        push's time is the controller's ``weight_sync`` phase). With ``offload`` the engine's side of the
        probe runs at the next ``generate`` and {} is returned here."""
        self.rollout.update_weights(self.export())
        if self.offload is not None:
            self._pending_probe = self._actor_probe()
            return {}
        return self.probe()

    def _actor_probe(self) -> torch.Tensor | None:
        ids = self.rollout.probe_ids
        if not ids:
            return None
        return torch.tensor(probe_logprobs(self.actor, ids, self.pad_token_id), dtype=torch.float64)

    def probe(self) -> dict[str, float]:
        """Engine vs trainer log-probs of the engine's ``probe_ids`` (every server of it); RuntimeError past
        its ``probe_tolerance``. {} for an engine that asks for no probe (a copy of the actor)."""
        return self._compare(self._actor_probe())

    def _compare(self, want: torch.Tensor | None) -> dict[str, float]:
        ids = self.rollout.probe_ids
        if want is None or not ids:
            return {}
        worst = 0.0
        for got in self.rollout.prompt_logprobs(list(ids)):
            got = torch.as_tensor(got, dtype=torch.float64).flatten()
            if got.shape != want.shape:
                raise ValueError(f"weight-sync probe: the engine gave {got.numel()} log-probs for {len(ids)} "
                                 f"probe ids (want {len(ids) - 1})")
            diff = float((got - want).abs().max())
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
        tol = self.rollout.probe_tolerance
        if worst > tol:
            raise RuntimeError(
                f"weight-sync probe failed: max |engine - trainer| log-prob = {worst:.4g} on {len(ids)} probe "
                f"tokens, over the tolerance {tol} (rollout.sglang.probe_tolerance); the rollout engine is not "
                "running the trainer's weights")
        return {PROBE_METRIC: worst}

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> tuple[list[Sample], dict[str, float]]:
        """``rollout.generate``: (samples, what the engine measured). When the engine lost the weights
        (``RolloutNeedsWeights``), the actor's weights go to what was restarted (``resync_stale``), are
        probed, and the whole call is generated again, at most ``max_resyncs`` times."""
        resyncs, resynced = 0, {}
        if self._pending_probe is not None:  # the push's probe, now that the engine holds its memory again
            want, self._pending_probe = self._pending_probe, None
            self._deferred = self._compare(want)
        while True:
            try:
                samples, metrics = self.rollout.generate(prompt_ids, n, sampling)
                break
            except RolloutNeedsWeights as e:
                if resyncs == self.rollout.max_resyncs:
                    raise RuntimeError(f"rollout: the engine lost its weights again after {resyncs} re-syncs: {e}") from e
                log.warning("rollout: %s; re-sending the weights", e)
                t0 = time.perf_counter()
                if self.offload is not None:  # the export and the probe forward need the actor's weights
                    self.offload.reload()
                self.rollout.resync_stale(self.export())
                want = self._actor_probe()
                if self.offload is not None:
                    self.offload.offload()
                resynced = {**self._compare(want), "timing/weight_resync_s": time.perf_counter() - t0}
                resyncs += 1
        if resyncs:
            resynced["rollout/weight_resyncs"] = float(resyncs)
        return samples, {**metrics, **resynced}
