"""The TEMPO math: pure torch, no I/O, no distributed code; recipes.py says which of it each mode uses.

The names below load on first use, so that reading a recipe (config validation, ``tempo-mega plan``)
does not import torch.
"""

from __future__ import annotations

from tempo_mega._lazy import lazy_getattr

_NAMES = {
    "em_token_advantages": "advantages", "gae_advantages": "advantages", "masked_mean": "advantages",
    "masked_whiten": "advantages", "GroupFilterResult": "filters", "filter_groups": "filters",
    "agg_loss": "losses", "critic_loss": "losses", "gspo_policy_loss": "losses", "ppo_policy_loss": "losses",
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES)
