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
from tempo_mega.rollout.background import finish_generate, start_generate
from tempo_mega.rollout.base import RolloutEngine, RolloutNeedsWeights, SamplingParams
from tempo_mega.rollout.parts import SampledPart
from tempo_mega.rollout.samples import pack_samples, unpack_samples
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
        # rollout.async_steps=1: the next step's first generation round, in flight (_pending) or in hand
        # (_prefetched: its prompts and samples, checkpointed with the run)
        self._pending: dict | None = None
        self._prefetched: dict | None = None

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> dict[str, float]:
        a, t, r = self.cfg.algo, self.timer, self.recipe
        t.reset()
        with t.phase("step"):
            with t.phase("rollout"):
                batch, m = self.collect_batch(step, self._take_prefetched(step))
                if self.rollout.release_during_training:
                    self.rollout.release_memory()  # colocated: the GPU memory is the trainer's until the sync
                self.offload.reload()  # and the trainer's own state back (trainer.offload_during_rollout)
                if self.cfg.rollout.async_steps and step + 1 < self.cfg.trainer.total_steps:
                    self.start_prefetch(step + 1)  # sampled while this step trains, with the weights it started from
            if len(batch) == 0:  # every group was uninformative, even after refills: nothing to learn from
                log.warning("step %d: no informative group after %d generation batches; no update",
                            step, int(m["rollout/gen_batches"]))
                self.finish_prefetch()
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
                self.finish_prefetch()  # the next step's samples are all in before the engine's weights change
                m.update(self.sync_weights())
                if self._prefetched is not None:
                    self._prefetched["pushes_since"] += 1
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
        elapsed = time.perf_counter() - t0
        return self.score_part(prompts, labeled, first_group, samples, engine, elapsed, elapsed)

    def score_part(self, prompts: list[tuple[list[int], str | None]], labeled: bool, first_group: int,
                   samples: list, engine: dict[str, float], gen_s: float, wait_s: float) -> SampledPart:
        """The texts and scores of one generate call's samples (``engine``: what the engine measured;
        ``gen_s`` its sampling time, ``wait_s`` how long the trainer waited for it)."""
        self._gen["seconds"] += gen_s
        self._gen["wait_seconds"] += wait_s
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

    # ------------------------------------------------------------------ one-step-off (rollout.async_steps)
    def _draw_round(self, want: dict[str, int], seed: int, gen_batches: int, next_group: int) -> tuple[list[dict], int]:
        """The prompts of one generation round (a generate call per kind), drawn from the pool now."""
        calls = []
        for kind, count in want.items():
            if count > 0:
                drawn = self.prompts.draw(kind, count)
                calls.append({"prompts": drawn, "labeled": kind == "labeled",
                              "seed": seed + gen_batches * 17 + (kind == "labeled"), "first_group": next_group})
                next_group += len(drawn)
        return calls, next_group

    def _step_seed(self, step: int) -> int:
        return self.cfg.trainer.seed * 1_000_003 + step * 1009

    def start_prefetch(self, step: int) -> None:
        """Draw step ``step``'s first generation round and sample it in the background, with the weights the
        engine holds now (the trainer trains meanwhile): ``finish_prefetch`` collects it."""
        a = self.cfg.algo
        want = self.recipe.prompt_counts(a.labeled_prompts_per_step, a.unlabeled_prompts_per_step)
        calls, next_group = self._draw_round(want, self._step_seed(step), 0, 0)
        n = a.num_samples_per_prompt
        jobs = [([p for p, _ in c["prompts"]], n, self.sampling(c["seed"])) for c in calls]
        self._pending = {"step": step, "calls": calls, "next_group": next_group,
                         "handle": start_generate(self.rollout, jobs)}

    def finish_prefetch(self) -> None:
        """Wait for the samples ``start_prefetch`` asked for (every rank; the samples reach every rank). A
        sampler that lost its weights meanwhile (``RolloutNeedsWeights``: a restarted server) loses the
        round: the step samples the same prompts again after the weight push, without staleness."""
        pend, self._pending = self._pending, None
        if pend is None:
            return
        t0 = time.perf_counter()
        try:
            results = finish_generate(self.rollout, pend["handle"])
        except RolloutNeedsWeights as e:
            log.warning("rollout: step %d's samples were lost in the background (%s); they are sampled again "
                        "after the weight push", pend["step"], e)
            results = None
        self._prefetched = {"step": pend["step"], "calls": pend["calls"], "next_group": pend["next_group"],
                            "results": results, "waited_s": time.perf_counter() - t0, "pushes_since": 0}

    def _take_prefetched(self, step: int) -> dict | None:
        pre, self._prefetched = self._prefetched, None
        if pre is not None and pre["step"] != step:
            raise RuntimeError(f"rollout.async_steps: samples prefetched for step {pre['step']} at step {step}")
        return pre

    def prefetch_state(self) -> dict | None:
        """The prefetched round (prompts, samples, staleness) for a checkpoint: a resumed run trains on the
        samples the uninterrupted one would have (SGLang does not sample reproducibly, so they are kept
        rather than sampled again). Only plain data: ``pack_samples``' tensors and bytes."""
        if self._pending is not None:
            raise RuntimeError("prefetch_state: a background rollout is still in flight (finish_prefetch first)")
        pre = self._prefetched
        if pre is None:
            return None
        results = None if pre["results"] is None else [
            {"samples": list(pack_samples(samples)), "metrics": dict(metrics)} for samples, metrics in pre["results"]]
        return {**{k: pre[k] for k in ("step", "next_group", "waited_s", "pushes_since")},
                "calls": [{**c, "prompts": [[list(ids), ans] for ids, ans in c["prompts"]]} for c in pre["calls"]],
                "results": results}

    def load_prefetch_state(self, state: dict | None) -> None:
        if state is None:
            self._prefetched = None
            return
        results = None if state["results"] is None else [
            (unpack_samples(*r["samples"]), r["metrics"]) for r in state["results"]]
        calls = [{**c, "prompts": [(list(ids), ans) for ids, ans in c["prompts"]]} for c in state["calls"]]
        self._prefetched = {**{k: state[k] for k in ("step", "next_group", "waited_s", "pushes_since")},
                            "calls": calls, "results": results}

    def collect_batch(self, step: int, prefetched: dict | None = None) -> tuple[RolloutBatch, dict[str, float]]:
        """Steps 1-3: one mixed batch, labeled groups filtered and refilled up to max_gen_batches. The
        filter reads the per-row scores only; the tensors are built once, from the rows kept.
        ``prefetched`` (rollout.async_steps): the first round's prompts and samples, sampled while the
        step before trained (``rollout/staleness``: the weight pushes since; refills are sampled now)."""
        a = self.cfg.algo
        seed = self._step_seed(step)
        self._gen.clear()
        parts: list[SampledPart] = []
        next_group, gen_batches, result = 0, 0, None
        want = self.recipe.prompt_counts(a.labeled_prompts_per_step, a.unlabeled_prompts_per_step)
        target = sum(want.values())
        staleness = 0.0
        while gen_batches < a.max_gen_batches:
            if gen_batches == 0 and prefetched is not None:
                calls, next_group, results = prefetched["calls"], prefetched["next_group"], prefetched["results"]
                if results is not None:
                    staleness = float(prefetched["pushes_since"])
            else:
                (calls, next_group), results = self._draw_round(want, seed, gen_batches, next_group), None
            for k, c in enumerate(calls):
                if results is None:
                    part = self.sample_part(c["prompts"], c["labeled"], c["seed"], c["first_group"])
                else:
                    samples, engine = results[k]
                    part = self.score_part(c["prompts"], c["labeled"], c["first_group"], samples, engine,
                                           engine.get("timing/rollout_s", 0.0), prefetched["waited_s"] if k == 0 else 0.0)
                if not c["labeled"] and self.recipe.pseudo_reward:
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
        m["timing/rollout_wait_s"] = self._gen["wait_seconds"]  # the trainer waited for samples this long
        if self.cfg.rollout.async_steps:
            m["rollout/staleness"] = staleness  # weight pushes between the first round's sampling and this step
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
