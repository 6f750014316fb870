"""The EM loop of TEMPO, one step at a time (the math: docs/algorithm.md).

    rollout a mixed labeled/unlabeled batch -> verify labeled rows -> filter groups (refill)
    -> old log-probs and values (weights before the step) -> rewards -> advantages
    -> E-step: critic on labeled rows -> M-step: actor on all rows -> push weights to the sampler

``algo.mode`` only changes where rewards come from and which losses run:
  tempo                    unlabeled R = critic's last-token value; em_token advantages; GSPO
  supervised_continuation  tempo's losses on labeled prompts only (ablation)
  ttrl / empo              unlabeled R = majority vote / semantic-cluster share; the critic fits
                           those pseudo-rewards (the reward drifts with the policy)
  rlvr                     Stage 1: labeled prompts only, GAE (gamma = lambda = 1) and token PPO
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tempo_mega.algo import (
    critic_loss,
    em_token_advantages,
    filter_groups,
    gae_advantages,
    gspo_policy_loss,
    ppo_policy_loss,
)
from tempo_mega.algo.advantages import last_valid_index
from tempo_mega.backends.base import TrainBackend
from tempo_mega.batch import RolloutBatch
from tempo_mega.config import TrainConfig
from tempo_mega.distributed import broadcast_object
from tempo_mega.rewards import (
    default_grading_workers,
    empo_rewards,
    grade_responses,
    pseudo_rewards,
    start_grading_workers,
    ttrl_rewards,
)
from tempo_mega.rollout.base import RolloutEngine, Sample, SamplingParams, weights_device
from tempo_mega.telemetry.timing import PhaseTimer

log = logging.getLogger(__name__)


@dataclass
class PromptSource:
    """Where a step's prompts come from: ``draw(kind, n)`` -> list of (token ids, gold answer or None).
    ``decode_batch``, where given, decodes many responses in one call (``data.decode_responses``)."""

    draw: Callable[[str, int], list[tuple[list[int], str | None]]]  # kind: "labeled" | "unlabeled"
    decode: Callable[[list[int]], str]
    pad_token_id: int
    stop_token_ids: tuple[int, ...]
    decode_batch: Callable[[list[list[int]]], list[str]] | None = None

    def decode_many(self, batch: list[list[int]]) -> list[str]:
        return self.decode_batch(batch) if self.decode_batch is not None else [self.decode(x) for x in batch]


@dataclass
class SampledPart:
    """One generate call's rows before tensors: the ragged samples with their texts and scores (the
    step's parts are filtered on these and turned into one ``RolloutBatch`` once)."""

    prompt_ids: list[list[int]]
    samples: list[Sample]
    labeled: bool | list[bool]
    group_ids: list[int]
    scores: list[float]
    texts: list[str]
    answers: list[str | None]

    def __len__(self) -> int:
        return len(self.samples)

    def labeled_rows(self) -> list[bool]:
        return list(self.labeled) if isinstance(self.labeled, list) else [self.labeled] * len(self.samples)

    @staticmethod
    def join(parts: list[SampledPart]) -> SampledPart:
        def flat(name: str) -> list:
            return [x for p in parts for x in getattr(p, name)]

        return SampledPart(prompt_ids=flat("prompt_ids"), samples=flat("samples"),
                           labeled=[x for p in parts for x in p.labeled_rows()], group_ids=flat("group_ids"),
                           scores=flat("scores"), texts=flat("texts"), answers=flat("answers"))

    def select(self, rows: list[int]) -> SampledPart:
        lab = self.labeled_rows()
        return SampledPart(prompt_ids=[self.prompt_ids[i] for i in rows], samples=[self.samples[i] for i in rows],
                           labeled=[lab[i] for i in rows], group_ids=[self.group_ids[i] for i in rows],
                           scores=[self.scores[i] for i in rows], texts=[self.texts[i] for i in rows],
                           answers=[self.answers[i] for i in rows])

    def to_batch(self, pad_token_id: int) -> RolloutBatch:
        s = self.samples
        return RolloutBatch.from_samples(
            self.prompt_ids, [x.response_ids for x in s], is_labeled=self.labeled_rows(), group_ids=self.group_ids,
            pad_token_id=pad_token_id, rollout_logprobs=[x.logprobs for x in s], scores=self.scores,
            meta={"text": self.texts, "answer": self.answers, "truncated": [x.finish_reason == "length" for x in s]},
        )


class BoundLoss:
    """Binds an algo/ loss to the fields of a micro-batch; ``agg`` tells the backend how to weight
    micro-batches (every loss used here averages over rows, except token-mean PPO).

    With ``kernel`` (a packed tempo_mega.kernels loss that equals ``fn``), the loss and its gradient
    come from the kernel on the packed valid tokens; the metrics still come from ``fn``, without grad.
    """

    def __init__(self, fn, fields: tuple[str, ...], agg: str = "seq", kernel=None, **kw):
        self.fn, self.fields, self.agg, self.kernel, self.kw = fn, fields, agg, kernel, kw

    def __call__(self, output: torch.Tensor, mb: RolloutBatch):
        mask = mb.response_mask.to(output.device)
        inputs = [output, *(getattr(mb, f).to(output.device) for f in self.fields)]
        if self.kernel is None:
            return self.fn(*inputs, mask, **self.kw)
        from tempo_mega.kernels import pack_padded

        with torch.no_grad():
            _, metrics = self.fn(*(x.detach() for x in inputs), mask, **self.kw)
        packed = [pack_padded(x, mask) for x in inputs]
        return self.kernel(*(x for x, _ in packed), packed[0][1], **self.kw), metrics


# per-call counters a rollout engine may report in ``last_metrics`` (requests resubmitted after a server
# failed, weight re-syncs of restarted servers), summed over a step's generate calls
_ENGINE_COUNTERS = ("rollout/retried_requests", "rollout/weight_resyncs", "rollout/server_aborts",
                    "rollout/clamped_requests")


class TempoController:
    def __init__(self, cfg: TrainConfig, actor: TrainBackend, critic: TrainBackend, rollout: RolloutEngine,
                 prompts: PromptSource, timer: PhaseTimer | None = None):
        self.cfg, self.actor, self.critic, self.rollout, self.prompts = cfg, actor, critic, rollout, prompts
        self.timer = timer or PhaseTimer()
        a = cfg.algo
        self.labeled_only = a.mode in ("rlvr", "supervised_continuation")
        self.pseudo_reward = {"ttrl": ttrl_rewards, "empo": empo_rewards}.get(a.mode)
        self.grading_workers = a.grading_workers or default_grading_workers()
        if self.grading_workers > 1:  # started beside the model set-up, not in the first step
            threading.Thread(target=start_grading_workers, args=(self.grading_workers,), daemon=True,
                             name="grading-workers-start").start()
        self._gen: defaultdict[str, float] = defaultdict(float)  # the step's generate calls, summed

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        a, t = self.cfg.algo, self.timer
        t.reset()
        with t.phase("step"):
            with t.phase("rollout"):
                batch, m = self.collect_batch(step)
                if getattr(self.rollout, "release_during_training", False):
                    self.rollout.release_memory()  # colocated: the GPU memory is the trainer's until the push
            if len(batch) == 0:  # every group was uninformative, even after refills: nothing to learn from
                log.warning("step %d: no informative group after %d generation batches; no update",
                            step, int(m["rollout/gen_batches"]))
                m.update(t.metrics())
                return m
            with t.phase("logprob"):
                batch.old_logprobs = self.actor.forward_logprobs(batch)
                batch.values = self.critic.forward_values(batch)
            m.update(logprob_mismatch(batch))
            self.compute_advantages(batch)
            if a.tis_cap > 0:
                m.update(apply_truncated_is(batch, a.tis_cap))
            if bool((~batch.is_labeled).any()):  # the reward unlabeled rows were trained on, once known
                m["rollout/unlabeled_reward_mean"] = float(batch.scores[~batch.is_labeled].mean())
            critic_on = a.e_step_every > 0 and step % a.e_step_every == 0
            with t.phase("e_step"):
                critic_batch = batch.select(batch.is_labeled) if self.trains_critic_on_labeled_only else batch
                frozen = not critic_on or len(critic_batch) == 0
                if not frozen:
                    m.update(self.critic.train_step(critic_batch, self.critic_loss()))
                m["critic/updated"] = float(not frozen)
            with t.phase("m_step"):
                m.update(self.actor.train_step(batch, self.policy_loss()))
            with t.phase("weight_sync"):
                self.rollout.update_weights(self.actor.export_weights(device=weights_device(self.rollout)))
        m.update(t.metrics())
        m["perf/tokens_per_s"] = batch.num_tokens() / max(m["timing/step_s"], 1e-9)
        m["perf/num_tokens"] = float(batch.num_tokens())
        return m

    @property
    def trains_critic_on_labeled_only(self) -> bool:
        # TEMPO's E-step: only verified outcomes are regression targets. TTRL/EMPO fit pseudo-rewards.
        return self.pseudo_reward is None

    # ------------------------------------------------------------------ rollout + reward + filter
    def sampling(self, seed: int, temperature: float | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature or r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_response_tokens=r.max_response_tokens,
                              stop_token_ids=self.prompts.stop_token_ids, seed=seed)

    def generate(self, prompts: list[tuple[list[int], str | None]], labeled: bool, seed: int,
                 first_group: int, n: int | None = None, temperature: float | None = None) -> RolloutBatch:
        """Sample n responses per prompt and score them (verified for labeled prompts)."""
        return self.sample_part(prompts, labeled, seed, first_group, n, temperature).to_batch(self.prompts.pad_token_id)

    def sample_part(self, prompts: list[tuple[list[int], str | None]], labeled: bool, seed: int,
                    first_group: int, n: int | None = None, temperature: float | None = None) -> SampledPart:
        """``generate``'s samples, texts and scores, before any tensor is built."""
        n = n or self.cfg.algo.num_samples_per_prompt
        t0 = time.perf_counter()
        samples = self.rollout.generate([p for p, _ in prompts], n, self.sampling(seed, temperature))
        self._gen["seconds"] += time.perf_counter() - t0
        self._gen["tokens"] += sum(len(s.response_ids) for s in samples)
        engine = getattr(self.rollout, "last_metrics", None) or {}  # SGLang's fault counters, where given
        for key in _ENGINE_COUNTERS:
            self._gen[key] += float(engine.get(key, 0.0))
        texts = self.prompts.decode_many([s.response_ids for s in samples])
        answers = [prompts[s.prompt_index][1] for s in samples]
        a = self.cfg.algo
        if labeled:
            ok = grade_responses(texts, answers, lenient=a.lenient_grading, workers=self.grading_workers)
            # rank 0's verdicts on every rank: a comparison that times out on one rank only must not
            # give the ranks different batches
            scores = broadcast_object([a.score_positive if x else a.score_negative for x in ok])
        else:
            scores = [0.0] * len(samples)
        return SampledPart(prompt_ids=[prompts[s.prompt_index][0] for s in samples], samples=list(samples),
                           labeled=labeled, group_ids=[first_group + s.prompt_index for s in samples],
                           scores=scores, texts=texts, answers=answers)

    def collect_batch(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """Steps 1-3: one mixed batch, labeled groups filtered and refilled up to max_gen_batches. The
        filter reads the per-row scores only; the tensors are built once, from the rows kept."""
        a = self.cfg.algo
        seed = self.cfg.trainer.seed * 1_000_003 + step * 1009
        self._gen.clear()
        parts: list[SampledPart] = []
        next_group = 0
        want = {"labeled": a.labeled_prompts_per_step, "unlabeled": a.unlabeled_prompts_per_step}
        if self.labeled_only:
            want["unlabeled"] = 0
        gen_batches = 0
        result = None
        while gen_batches < a.max_gen_batches:
            for kind, count in want.items():
                if count > 0:
                    drawn = self.prompts.draw(kind, count)
                    part = self.sample_part(drawn, kind == "labeled", seed + gen_batches * 17 + (kind == "labeled"), next_group)
                    next_group += len(drawn)
                    if kind == "unlabeled" and self.pseudo_reward is not None:
                        self.apply_pseudo_reward(part)
                    parts.append(part)
            gen_batches += 1
            if not a.filter_groups:
                break
            target = a.labeled_prompts_per_step + (0 if self.labeled_only else a.unlabeled_prompts_per_step)
            result = filter_groups(torch.tensor([x for p in parts for x in p.scores], dtype=torch.float32),
                                   torch.tensor([g for p in parts for g in p.group_ids], dtype=torch.long),
                                   torch.tensor([p.labeled for p in parts for _ in p.samples], dtype=torch.bool),
                                   target_num_groups=target)
            if result.groups_needed == 0:
                break
            want = {"labeled": result.groups_needed, "unlabeled": 0}  # unlabeled groups are never dropped
        whole = SampledPart.join(parts)
        if result is not None:
            whole = whole.select(result.keep.nonzero().flatten().tolist())
        batch = whole.to_batch(self.prompts.pad_token_id)
        m = self.rollout_metrics(batch)
        m["rollout/gen_batches"] = float(gen_batches)
        # the engine's speed over every sample it made this step (dropped groups included)
        m["rollout/generated_tokens"] = self._gen["tokens"]
        m["rollout/tokens_per_s"] = self._gen["tokens"] / max(self._gen["seconds"], 1e-9)
        m.update({key: self._gen[key] for key in _ENGINE_COUNTERS})
        if result is not None:
            m["rollout/dropped_groups"] = float(result.dropped_groups)
            m["rollout/groups_short"] = float(result.groups_needed)
        return batch, m

    def apply_pseudo_reward(self, part: SampledPart) -> None:
        """TTRL/EMPO: each unlabeled group's responses are rewarded from the group itself."""
        a = self.cfg.algo
        order: dict[int, list[int]] = {}
        for i, g in enumerate(part.group_ids):
            order.setdefault(g, []).append(i)
        index = list(order.values())
        rewards = pseudo_rewards(a.mode, [[part.texts[i] for i in idx] for idx in index],
                                 positive=a.score_positive, negative=a.score_negative, workers=self.grading_workers)
        rewards = broadcast_object(rewards)  # rank 0's, on every rank (see sample_part)
        scores = list(part.scores)
        for idx, r in zip(index, rewards):
            for i, x in zip(idx, r):
                scores[i] = float(x)
        part.scores = scores

    @staticmethod
    def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
        lengths = batch.response_lengths().float()
        lab = batch.is_labeled
        m = {
            "rollout/num_samples": float(len(batch)),
            "rollout/response_len_mean": float(lengths.mean()) if len(batch) else 0.0,
            "rollout/response_len_max": float(lengths.max()) if len(batch) else 0.0,
            "rollout/truncated_frac": sum(batch.meta["truncated"]) / max(len(batch), 1),
            "rollout/labeled_frac": float(lab.float().mean()) if len(batch) else 0.0,
        }
        # verified score of labeled rows; in pseudo-reward modes (no labeled rows) the pseudo-reward
        m["rollout/score_mean"] = float(batch.scores[lab].mean() if bool(lab.any()) else batch.scores.mean()) if len(batch) else 0.0
        return m

    # ------------------------------------------------------------------ advantages and losses
    def compute_advantages(self, batch: RolloutBatch) -> None:
        """Step 5. Pseudo-reward modes treat their rewards as scores (R = score on every row)."""
        a = self.cfg.algo
        if a.mode == "rlvr":
            rewards = torch.zeros_like(batch.values)
            rows = torch.arange(len(batch))
            rewards[rows, last_valid_index(batch.response_mask)] = batch.scores.to(rewards.dtype)
            batch.advantages, batch.returns = gae_advantages(rewards, batch.values, batch.response_mask)
            return
        use_score = batch.is_labeled if self.pseudo_reward is None else torch.ones_like(batch.is_labeled)
        batch.advantages, batch.returns = em_token_advantages(batch.values, batch.scores, batch.response_mask,
                                                              use_score, eps=a.adv_eps)
        if self.pseudo_reward is None and bool((~batch.is_labeled).any()):
            # the reward TEMPO gives unlabeled rows: the critic's last-token value
            unl = ~batch.is_labeled
            batch.scores = torch.where(unl, batch.returns[:, 0].to(batch.scores.dtype), batch.scores)

    def critic_loss(self) -> BoundLoss:
        kernel = self._kernel("seq_clipped_value_loss")
        return BoundLoss(critic_loss, ("values", "returns"), kernel=kernel, clip_range_value=self.cfg.algo.clip_range_value)

    def _kernel(self, name: str):
        if not getattr(self.actor, "use_kernels", False):
            return None
        import tempo_mega.kernels as kernels

        return getattr(kernels, name)

    def policy_loss(self) -> BoundLoss:
        a = self.cfg.algo
        if a.mode == "rlvr":
            return BoundLoss(ppo_policy_loss, ("old_logprobs", "advantages"), agg="token",
                          clip_low=a.ppo_clip_low, clip_high=a.ppo_clip_high, loss_agg_mode="token-mean")
        return BoundLoss(gspo_policy_loss, ("old_logprobs", "advantages"), kernel=self._kernel("gspo_loss"),
                         clip_low=a.clip_low, clip_high=a.clip_high)


def logprob_mismatch(batch: RolloutBatch) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's for the same tokens and weights: near 0
    for the HF engine, the precision/kernel gap for SGLang (input for a truncated-IS correction)."""
    if batch.rollout_logprobs is None or batch.old_logprobs is None:
        return {}
    mask = batch.response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {}
    # |diff| with padding set to 0, in place: the mean over valid tokens is its sum over n, and padding
    # cannot raise the max; no gather of the valid tokens (a padded batch is mostly padding)
    diff = torch.sub(batch.rollout_logprobs, batch.old_logprobs).abs_().masked_fill_(~mask, 0.0)
    return {"rollout/logprob_diff_mean": float(diff.sum(dtype=torch.float64)) / n,
            "rollout/logprob_diff_max": float(diff.max())}


def apply_truncated_is(batch: RolloutBatch, cap: float) -> dict[str, float]:
    """Truncated importance sampling: the samples came from the rollout engine's distribution, the
    losses assume the trainer's; weight each token by w = min(exp(old_logp - rollout_logp), cap).
    The policy losses are positively homogeneous in the advantage (max(-wA r, -wA clip(r)) =
    w max(-A r, -A clip(r)) for w > 0), so scaling the advantages by w weights every token's loss
    exactly, without touching the loss functions."""
    if batch.rollout_logprobs is None:
        return {}
    mask = batch.response_mask.bool()
    # one buffer, worked on in place: padding gets log w = 0, so w = min(1, cap) there, and the
    # metrics over valid tokens are the whole buffer's minus the padding's known share
    w = torch.sub(batch.old_logprobs, batch.rollout_logprobs).masked_fill_(~mask, 0.0).exp_()
    n = int(mask.sum())
    pad = mask.numel() - n
    clipped = int((w > cap).sum()) - (pad if cap < 1.0 else 0)
    w.clamp_(max=cap)
    batch.advantages = batch.advantages * w.to(batch.advantages.dtype)
    if n == 0:
        return {}
    return {"rollout/tis_weight_mean": (float(w.sum(dtype=torch.float64)) - pad * min(1.0, cap)) / n,
            "rollout/tis_clip_frac": clipped / n}
