"""One recipe per ``algo.mode``: which prompts a step draws, the reward of unlabeled rows, the advantage
estimator, the policy loss and the critic's rows (docs/algorithm.md).

The controller, config validation, evaluation and the planner ask the recipe; nothing else compares
mode strings. Everything here is tensor math or a pure function of texts (the pseudo-rewards).

    mode                     prompts            unlabeled reward        advantages  policy  critic rows
    tempo                    labeled+unlabeled  critic's last value     em_token    gspo    labeled
    supervised_continuation  labeled            -                       em_token    gspo    labeled
    ttrl                     unlabeled          majority vote           em_token    gspo    all
    empo                     unlabeled          semantic-cluster share  em_token    gspo    all
    rlvr                     labeled            -                       gae         ppo     labeled
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the math runs: config and `tempo-mega plan` read recipes without it
    from torch import Tensor

    from tempo_mega.algo.losses import LossSpec

UNLABELED_REWARDS = ("critic", "ttrl", "empo", "none")
PSEUDO_REWARDS = ("ttrl", "empo")  # rewards computed from a group of responses alone


def reward_range(reward: str, negative: float, positive: float) -> tuple[float, float]:
    """The range a reward (one of UNLABELED_REWARDS) lives in, for calibration: EMPO's cluster shares in
    [0, 1], the others between algo.score_negative and algo.score_positive (the critic's targets)."""
    return (0.0, 1.0) if reward == "empo" else (negative, positive)


@dataclass(frozen=True)
class Recipe:
    mode: str
    labeled_prompts: bool  # a step draws labeled prompts (verified rewards)
    unlabeled_prompts: bool  # a step draws unlabeled prompts
    unlabeled_reward: str  # one of UNLABELED_REWARDS
    advantage: str  # "em_token" | "gae"
    policy: str  # "gspo" (sequence-level clip) | "ppo" (token-mean PPO)
    critic_rows: str  # "labeled": only verified outcomes are regression targets | "all": pseudo-rewards too

    @property
    def pseudo_reward(self) -> bool:
        """Unlabeled rows are scored from their group alone (TTRL/EMPO), when they are sampled."""
        return self.unlabeled_reward in PSEUDO_REWARDS

    @property
    def needs_unlabeled(self) -> bool:
        """The mode is meaningless without unlabeled prompts (it would be RLVR on labeled ones)."""
        return self.unlabeled_reward == "critic" or self.pseudo_reward

    def prompt_counts(self, labeled: int, unlabeled: int) -> dict[str, int]:
        """How many prompts of each kind a step draws, from algo.*_prompts_per_step."""
        return {"labeled": labeled if self.labeled_prompts else 0,
                "unlabeled": unlabeled if self.unlabeled_prompts else 0}

    def unused_prompt_count(self) -> str | None:
        """The ``algo.*_prompts_per_step`` key this mode does not use (config derives it as 0)."""
        if not self.unlabeled_prompts:
            return "unlabeled_prompts_per_step"
        if not self.labeled_prompts:
            return "labeled_prompts_per_step"
        return None

    def group_rewards(self, groups: Sequence[Sequence[str]], *, positive: float, negative: float,
                      workers: int = 1) -> list[list[float]]:
        """The pseudo-reward of every response of every group (TTRL: +-1 for the majority answer; EMPO:
        the share of its semantic cluster). Only for modes with ``pseudo_reward``."""
        if not self.pseudo_reward:
            raise ValueError(f"algo.mode={self.mode}: no group reward (unlabeled reward {self.unlabeled_reward!r})")
        from tempo_mega.rewards.pseudo import pseudo_rewards

        return pseudo_rewards(self.unlabeled_reward, groups, positive=positive, negative=negative, workers=workers)

    def reward_range(self, negative: float, positive: float) -> tuple[float, float]:
        """The range this mode's unlabeled reward lives in, for calibration."""
        return reward_range(self.unlabeled_reward, negative, positive)

    def critic_reward(self, scores: Tensor, values: Tensor, response_mask: Tensor, is_labeled: Tensor) -> Tensor:
        """R_b of every row, [B]: the verified score of labeled rows; for unlabeled rows the critic's
        reward (tempo) or the pseudo-reward already in ``scores`` (ttrl, empo)."""
        import torch

        from tempo_mega.algo import advantages

        if self.unlabeled_reward != "critic":
            return scores
        last_value = advantages.critic_reward(values, response_mask)  # the critic's value before each row's last token
        return torch.where(is_labeled.bool(), scores, last_value.to(scores.dtype))

    def critic_row_mask(self, is_labeled: Tensor) -> Tensor | None:
        """The rows the E-step fits, or None for all rows."""
        return is_labeled if self.critic_rows == "labeled" else None

    def advantages(self, scores: Tensor, values: Tensor, response_mask: Tensor, is_labeled: Tensor, *,
                   eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor]:
        """(R_b [B], advantages [B, L], returns [B, L]) of a step's rows (``critic_reward``, then em_token
        advantages, or GAE with gamma = lambda = 1 on the outcome reward for RLVR)."""
        import torch

        from tempo_mega.algo.advantages import em_token_advantages, gae_advantages, outcome_token_rewards

        reward = self.critic_reward(scores, values, response_mask, is_labeled)
        if self.advantage == "gae":
            adv, ret = gae_advantages(outcome_token_rewards(reward, response_mask, values.dtype), values, response_mask)
        else:
            adv, ret = em_token_advantages(values, reward, response_mask, torch.ones_like(is_labeled, dtype=torch.bool),
                                           eps=eps)
        return reward, adv, ret

    def policy_loss(self, a) -> LossSpec:
        """The M-step's loss, with its clip settings from ``a`` (the algo config)."""
        from tempo_mega.algo.losses import LossSpec, gspo_policy_loss, ppo_policy_loss

        if self.policy == "ppo":
            return LossSpec(ppo_policy_loss, ("old_logprobs", "advantages"), agg="token",
                            kw=dict(clip_low=a.ppo_clip_low, clip_high=a.ppo_clip_high, loss_agg_mode="token-mean"))
        return LossSpec(gspo_policy_loss, ("old_logprobs", "advantages"), kernel="gspo_loss",
                        kw=dict(clip_low=a.clip_low, clip_high=a.clip_high))

    @staticmethod
    def critic_loss(a) -> LossSpec:
        """The E-step's loss: the sequence-clipped value loss around the old values."""
        from tempo_mega.algo.losses import LossSpec, critic_loss

        return LossSpec(critic_loss, ("values", "returns"), kernel="seq_clipped_value_loss",
                        kw=dict(clip_range_value=a.clip_range_value))


RECIPES: dict[str, Recipe] = {
    "tempo": Recipe("tempo", True, True, "critic", "em_token", "gspo", "labeled"),
    "rlvr": Recipe("rlvr", True, False, "none", "gae", "ppo", "labeled"),
    "ttrl": Recipe("ttrl", False, True, "ttrl", "em_token", "gspo", "all"),
    "empo": Recipe("empo", False, True, "empo", "em_token", "gspo", "all"),
    "supervised_continuation": Recipe("supervised_continuation", True, False, "none", "em_token", "gspo", "labeled"),
}
MODES = tuple(RECIPES)


def recipe(mode: str) -> Recipe:
    """The recipe of ``algo.mode``; ValueError naming the key for an unknown one."""
    if mode not in RECIPES:
        raise ValueError(f"config key 'algo.mode': must be one of {MODES}, got {mode!r}")
    return RECIPES[mode]
