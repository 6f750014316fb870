"""Evaluation inside a training run: hidden-answer accuracy on the unlabeled split, the trap families,
and the reward-drift monitor (how well each reward separates correct from wrong responses)."""

from __future__ import annotations

import torch

from tempo_mega.algo.advantages import critic_reward
from tempo_mega.algo.recipes import PSEUDO_REWARDS, RECIPES, recipe, reward_range
from tempo_mega.config import TrainConfig
from tempo_mega.controller import TempoController
from tempo_mega.data import PromptRecord
from tempo_mega.data.pool import PromptPool
from tempo_mega.distributed import broadcast_object
from tempo_mega.eval.metrics import (
    auroc,
    avg_at_k,
    distinct_answers,
    expected_calibration_error,
    pass_at_k_batch,
    reward_to_prob,
)
from tempo_mega.rewards import extract_answer, grade_responses


# ---------------------------------------------------------------------- evaluation
def trap_metrics(records: list[PromptRecord], answers: list[list[str | None]], correct: torch.Tensor) -> dict[str, float]:
    """On prompts that have a known tempting wrong answer (the synthetic task's carry/borrow families):
    their accuracy and how often the model gives exactly that wrong answer. A self-consistency reward
    that locks onto the trap shows up as a rising ``eval/trap_answer_frac``."""
    rows = [i for i, r in enumerate(records) if r.meta.get("trap_answer") is not None]
    if not rows:
        return {}
    hits = [a == records[i].meta["trap_answer"] for i in rows for a in answers[i]]

    def majority(xs: list[str | None]) -> str | None:  # most common given answer; ties -> first seen
        given = [x for x in xs if x is not None]
        return max(given, key=given.count) if given else None

    # the share of trap prompts whose majority answer (what TTRL rewards) IS the trap answer
    locked = [majority(answers[i]) == records[i].meta["trap_answer"] for i in rows]
    return {"eval/trap_family_avg@k": float(correct[rows].float().mean()),
            "eval/trap_answer_frac": sum(hits) / len(hits),
            "eval/trap_majority_frac": sum(locked) / len(locked)}


def evaluate(ctrl: TempoController, pool: PromptPool, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Hidden-answer accuracy on the unlabeled split and the reward-drift monitor: how well the reward
    the current mode trains on separates truly correct from wrong responses (AUROC, calibration)."""
    t, a = cfg.trainer, cfg.algo
    records = pool.test[: t.eval_max_prompts]
    if not records:
        return {}
    k = t.eval_num_samples
    prompts = [(pool.ids(r), None) for r in records]
    batch = ctrl.generate(prompts, labeled=False, seed=seed, first_group=0, n=k, temperature=t.eval_temperature)
    texts = batch.meta["text"]
    gold = [records[i // k].eval_answer for i in range(len(texts))]
    graded = [i for i, g in enumerate(gold) if g is not None]
    verdicts = grade_responses([texts[i] for i in graded], [gold[i] for i in graded], lenient=a.lenient_grading,
                               workers=ctrl.grading_workers)
    correct = [False] * len(texts)
    for i, v in zip(graded, verdicts):
        correct[i] = v
    correct = broadcast_object(correct)  # rank 0's verdicts on every rank (as the controller's)
    table = torch.tensor(correct).view(len(records), k)
    answers = [[extract_answer(texts[p * k + j]) for j in range(k)] for p in range(len(records))]
    m = {"eval/avg@k": avg_at_k(table), "eval/pass@1": pass_at_k_batch(table, 1),
         f"eval/pass@{k}": pass_at_k_batch(table, k), "eval/k": float(k),
         "eval/distinct_answers": distinct_answers(answers),
         "eval/response_len_mean": float(batch.response_lengths().float().mean()),
         "eval/truncated_frac": sum(batch.meta["truncated"]) / len(texts),
         "eval/grading_lenient": float(a.lenient_grading)}
    m.update(trap_metrics(records, answers, table))
    # every reward a mode could train on, scored against the hidden answers: TEMPO's critic reward and
    # the group pseudo-rewards, each from its recipe
    ctrl.offload.reload()  # the critic's weights, if the rollout had them (trainer.offload_during_rollout)
    rewards = {"critic": critic_reward(ctrl.critic.forward_values(batch), batch.response_mask).tolist()}
    groups = [texts[p * k:(p + 1) * k] for p in range(len(records))]
    for name in PSEUDO_REWARDS:
        per_group = RECIPES[name].group_rewards(groups, positive=a.score_positive, negative=a.score_negative,
                                                workers=ctrl.grading_workers)
        rewards[name] = [r for g in broadcast_object(per_group) for r in g]
    for name, r in rewards.items():
        m[f"eval/{name}_reward_auroc"] = auroc(r, correct)
        low, high = reward_range(name, a.score_negative, a.score_positive)
        m[f"eval/{name}_reward_ece"] = expected_calibration_error(reward_to_prob(r, low, high), correct)
    rec = recipe(a.mode)
    own = rec.unlabeled_reward if rec.pseudo_reward else "critic"
    m["eval/reward_auroc"] = m[f"eval/{own}_reward_auroc"]
    m["eval/reward_ece"] = m[f"eval/{own}_reward_ece"]
    return m
