"""The sampler/trainer mismatch: how far the rollout engine's log-probs are from the trainer's for the
same tokens and weights, and the truncated importance-sampling correction of the advantages."""

from __future__ import annotations

import torch
from torch import Tensor


def logprob_mismatch(rollout_lp: Tensor, trainer_lp: Tensor, response_mask: Tensor) -> dict[str, float]:
    """Mean and max of |rollout - trainer| over the valid tokens ([B, L] each; mask 1 = response token),
    as ``rollout/logprob_diff_mean`` / ``_max``: near 0 for the HF engine, the precision/kernel gap for
    SGLang. {} when there is no valid token."""
    mask = response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {}
    # |diff| with padding set to 0, in place: the mean over valid tokens is its sum over n, and padding
    # cannot raise the max; no gather of the valid tokens (a padded batch is mostly padding)
    diff = torch.sub(rollout_lp, trainer_lp).abs_().masked_fill_(~mask, 0.0)
    return {"rollout/logprob_diff_mean": float(diff.sum(dtype=torch.float64)) / n,
            "rollout/logprob_diff_max": float(diff.max())}


def truncated_is(advantages: Tensor, trainer_lp: Tensor, rollout_lp: Tensor, response_mask: Tensor,
                 cap: float) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling: the samples came from the rollout engine's distribution, the
    losses assume the trainer's; each token's advantage is weighted by w = min(exp(trainer_lp -
    rollout_lp), cap). The policy losses are positively homogeneous in the advantage (max(-wA r,
    -wA clip(r)) = w max(-A r, -A clip(r)) for w > 0), so scaling the advantages by w weights every
    token's loss exactly, without touching the loss functions.

    Returns (the weighted advantages, ``rollout/tis_weight_mean`` and ``rollout/tis_clip_frac`` over the
    valid tokens; {} when there is none)."""
    mask = response_mask.bool()
    # one buffer, worked on in place: padding gets log w = 0, so w = min(1, cap) there, and the
    # metrics over valid tokens are the whole buffer's minus the padding's known share
    w = torch.sub(trainer_lp, rollout_lp).masked_fill_(~mask, 0.0).exp_()
    n = int(mask.sum())
    pad = mask.numel() - n
    clipped = int((w > cap).sum()) - (pad if cap < 1.0 else 0)
    w.clamp_(max=cap)
    weighted = advantages * w.to(advantages.dtype)
    if n == 0:
        return weighted, {}
    return weighted, {"rollout/tis_weight_mean": (float(w.sum(dtype=torch.float64)) - pad * min(1.0, cap)) / n,
                      "rollout/tis_clip_frac": clipped / n}
