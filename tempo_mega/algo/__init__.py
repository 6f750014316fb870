"""The TEMPO math: pure torch, no I/O, no distributed code; recipes.py says which of it each mode uses.

The names below load on first use, so that reading a recipe (config validation, ``tempo-mega plan``)
does not import torch.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "em_token_advantages": "advantages", "gae_advantages": "advantages", "masked_mean": "advantages",
    "masked_whiten": "advantages", "GroupFilterResult": "filters", "filter_groups": "filters",
    "agg_loss": "losses", "critic_loss": "losses", "gspo_policy_loss": "losses", "ppo_policy_loss": "losses",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'tempo_mega.algo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tempo_mega.algo.{_NAMES[name]}"), name)
