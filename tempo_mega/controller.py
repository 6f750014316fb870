"""The EM loop of TEMPO, one step at a time (the math: docs/algorithm.md).

    rollout a mixed labeled/unlabeled batch -> verify labeled rows -> filter groups (refill)
    -> old log-probs and values (weights before the step) -> rewards -> advantages
    -> E-step: critic on labeled rows -> M-step: actor on all rows -> sync the sampler's weights

``algo.mode`` picks a recipe (algo/recipes.py): which prompts a step draws, where the unlabeled rows'
reward comes from, the advantage estimator, the policy loss and the rows the critic fits. The
controller is the only part that knows the step's order: the run layer calls ``step`` and nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import torch

from tempo_mega.algo import filter_groups
from tempo_mega.algo.correction import logprob_mismatch, truncated_is
from tempo_mega.algo.recipes import recipe
from tempo_mega.backends.base import TrainBackend
from tempo_mega.batch import RolloutBatch
from tempo_mega.config import TrainConfig
from tempo_mega.data.pool import PromptSource
from tempo_mega.distributed import broadcast_object
from tempo_mega.offload import TrainerOffload
from tempo_mega.rewards import default_grading_workers, grade_responses, start_grading_workers
from tempo_mega.rollout.base import RolloutEngine, SamplingParams
from tempo_mega.rollout.parts import SampledPart
from tempo_mega.telemetry.timing import PhaseTimer
from tempo_mega.weight_sync import WeightSync

log = logging.getLogger(__name__)

# per-call counters a rollout engine reports with its samples (requests resubmitted after a server
# failed, weight re-syncs of restarted servers), summed over a step's generate calls
ENGINE_COUNTERS = ("rollout/retried_requests", "rollout/weight_resyncs", "rollout/server_aborts",
                   "rollout/clamped_requests")
# what an engine reports of its state after a call (the step keeps the last): servers serving, of all;
# and, from an engine on several nodes, each node's own figures (rollout/node<k>/...)
ENGINE_GAUGES = ("rollout/servers_up", "rollout/servers")
PER_NODE_PREFIX = "rollout/node"


class TempoController:
    def __init__(self, cfg: TrainConfig, actor: TrainBackend, critic: TrainBackend, rollout: RolloutEngine,
                 prompts: PromptSource, timer: PhaseTimer | None = None, offload: TrainerOffload | None = None):
        self.cfg, self.actor, self.critic, self.rollout, self.prompts = cfg, actor, critic, rollout, prompts
        self.recipe = recipe(cfg.algo.mode)
        # trainer.offload_during_rollout: both roles' memory is the engine's while it generates
        self.offload = offload or TrainerOffload(cfg.trainer.offload_during_rollout, (actor, critic))
        self.weights = WeightSync(actor, rollout, prompts.pad_token_id, offload=self.offload)
        self.timer = timer or PhaseTimer()
        self.grading_workers = cfg.algo.grading_workers or default_grading_workers()
        if self.grading_workers > 1:  # started beside the model set-up, not in the first step
            threading.Thread(target=start_grading_workers, args=(self.grading_workers,), daemon=True,
                             name="grading-workers-start").start()
        self._gen: defaultdict[str, float] = defaultdict(float)  # the step's generate calls, summed

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        a, t, r = self.cfg.algo, self.timer, self.recipe
        t.reset()
        with t.phase("step"):
            with t.phase("rollout"):
                batch, m = self.collect_batch(step)
                if self.rollout.release_during_training:
                    self.rollout.release_memory()  # colocated: the GPU memory is the trainer's until the sync
                self.offload.reload()  # and the trainer's own state back (trainer.offload_during_rollout)
            if len(batch) == 0:  # every group was uninformative, even after refills: nothing to learn from
                log.warning("step %d: no informative group after %d generation batches; no update",
                            step, int(m["rollout/gen_batches"]))
                m.update(t.metrics())
                return m
            with t.phase("logprob"):
                batch.old_logprobs = self.actor.forward_logprobs(batch)
                batch.values = self.critic.forward_values(batch)
            m.update(self.advantages(batch))
            critic_on = a.e_step_every > 0 and step % a.e_step_every == 0
            with t.phase("e_step"):
                rows = r.critic_row_mask(batch.is_labeled)
                critic_batch = batch if rows is None else batch.select(rows)
                frozen = not critic_on or len(critic_batch) == 0
                if not frozen:
                    m.update(self.critic.train_step(critic_batch, r.critic_loss(a)))
                m["critic/updated"] = float(not frozen)
            with t.phase("m_step"):
                m.update(self.actor.train_step(batch, r.policy_loss(a)))
            with t.phase("weight_sync"):
                m.update(self.sync_weights())
        m.update(t.metrics())
        m["perf/tokens_per_s"] = batch.num_tokens() / max(m["timing/step_s"], 1e-9)
        m["perf/num_tokens"] = float(batch.num_tokens())
        return m

    def sync_weights(self) -> dict[str, float]:
        """The actor's weights into the sampler, then the probe: the engine's log-probs of its probe ids
        against the actor's (RuntimeError past the engine's tolerance); what was measured."""
        return self.weights.push()

    # ------------------------------------------------------------------ rollout + reward + filter
    def sampling(self, seed: int, temperature: float | None = None) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature or r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_response_tokens=r.max_response_tokens,
                              stop_token_ids=self.prompts.stop_token_ids, seed=seed,
                              return_routed_experts=self.cfg.algo.routing_replay != "none")

    def generate(self, prompts: list[tuple[list[int], str | None]], labeled: bool, seed: int,
                 first_group: int, n: int | None = None, temperature: float | None = None) -> RolloutBatch:
        """Sample n responses per prompt and score them (verified for labeled prompts)."""
        return self.sample_part(prompts, labeled, seed, first_group, n, temperature).to_batch(self.prompts.pad_token_id)

    def sample_part(self, prompts: list[tuple[list[int], str | None]], labeled: bool, seed: int,
                    first_group: int, n: int | None = None, temperature: float | None = None) -> SampledPart:
        """``generate``'s samples, texts and scores, before any tensor is built."""
        n = n or self.cfg.algo.num_samples_per_prompt
        self._gen.update(self.offload.offload())  # the trainer's memory to the engine (idempotent)
        t0 = time.perf_counter()
        # a restarted server without the weights is re-synced and the call generated again (WeightSync)
        samples, engine = self.weights.generate([p for p, _ in prompts], n, self.sampling(seed, temperature))
        self._gen["seconds"] += time.perf_counter() - t0
        self._gen["tokens"] += sum(len(s.response_ids) for s in samples)
        for key in ENGINE_COUNTERS:  # SGLang's fault counters, where it reports them
            self._gen[key] += float(engine.get(key, 0.0))
        self._gen.update({key: float(v) for key, v in engine.items()
                          if key in ENGINE_GAUGES or key.startswith(PER_NODE_PREFIX)})
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
        next_group, gen_batches, result = 0, 0, None
        want = self.recipe.prompt_counts(a.labeled_prompts_per_step, a.unlabeled_prompts_per_step)
        target = sum(want.values())
        while gen_batches < a.max_gen_batches:
            for kind, count in want.items():
                if count > 0:
                    drawn = self.prompts.draw(kind, count)
                    part = self.sample_part(drawn, kind == "labeled", seed + gen_batches * 17 + (kind == "labeled"), next_group)
                    next_group += len(drawn)
                    if kind == "unlabeled" and self.recipe.pseudo_reward:
                        self.apply_pseudo_reward(part)
                    parts.append(part)
            gen_batches += 1
            if not a.filter_groups:
                break
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
        m.update({key: self._gen[key] for key in ENGINE_COUNTERS})
        m.update({key: v for key, v in self._gen.items()
                  if key in ENGINE_GAUGES or key.startswith(PER_NODE_PREFIX) or key == "perf/offloaded_gib"})
        m["timing/rollout_wait_s"] = self._gen["seconds"]  # the trainer waited for samples this long
        # trainer.offload_during_rollout: the probe of the last push, whose engine side ran before sampling
        m.update(self.weights.take_deferred_probe())
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
        rewards = self.recipe.group_rewards([[part.texts[i] for i in idx] for idx in index],
                                            positive=a.score_positive, negative=a.score_negative,
                                            workers=self.grading_workers)
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

    # ------------------------------------------------------------------ rewards and advantages
    def advantages(self, batch: RolloutBatch) -> dict[str, float]:
        """Steps 4-5: every row's reward R_b (``batch.scores`` from here on: TEMPO's critic reward on
        unlabeled rows), the advantages and returns, the sampler/trainer mismatch and, with
        algo.tis_cap, the truncated-IS weights on the advantages."""
        a = self.cfg.algo
        m = {} if batch.rollout_logprobs is None else logprob_mismatch(batch.rollout_logprobs, batch.old_logprobs,
                                                                      batch.response_mask)
        batch.scores, batch.advantages, batch.returns = self.recipe.advantages(
            batch.scores, batch.values, batch.response_mask, batch.is_labeled, eps=a.adv_eps)
        if a.tis_cap > 0 and batch.rollout_logprobs is not None:
            batch.advantages, tis = truncated_is(batch.advantages, batch.old_logprobs, batch.rollout_logprobs,
                                                 batch.response_mask, a.tis_cap)
            m.update(tis)
        if bool((~batch.is_labeled).any()):  # the reward unlabeled rows were trained on
            m["rollout/unlabeled_reward_mean"] = float(batch.scores[~batch.is_labeled].mean())
        return m
