"""The TEMPO math: pure torch, no I/O, no distributed code."""

from tempo_mega.algo.advantages import em_token_advantages, gae_advantages, masked_mean, masked_whiten
from tempo_mega.algo.filters import GroupFilterResult, filter_groups
from tempo_mega.algo.losses import agg_loss, critic_loss, gspo_policy_loss, ppo_policy_loss

__all__ = [
    "GroupFilterResult",
    "agg_loss",
    "critic_loss",
    "em_token_advantages",
    "filter_groups",
    "gae_advantages",
    "gspo_policy_loss",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
]
