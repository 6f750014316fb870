"""Advantages and returns: TEMPO's em_token estimator and GAE for Stage-1 PPO.

Pure torch: no I/O, no distributed code, differentiable, any float dtype, any device.
Conventions: ``[B, L]`` tensors are aligned with ``response_mask`` (1 on valid response tokens,
response token t in column t); ``values[:, t]`` is V read *before* response token t.
Values at masked positions may hold anything (even NaN): they never reach a valid output.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0, and finite gradients there too."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask, else 0 (unlike x * mask, NaN/inf at masked positions do not leak)."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set, over ``dim`` (all dims when None).

    An empty selection gives 0, not NaN.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return _safe_div(_masked(x, mask).sum(), m.sum())
    return _safe_div(_masked(x, mask).sum(dim), m.sum(dim))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all masked positions; unbiased (Bessel) by default. Fewer than two positions
    give 0 when unbiased, since the unbiased variance of one sample is undefined."""
    x = _masked(x, mask)
    mean = masked_mean(x, mask)
    centered_sq = _masked((x - mean) ** 2, mask)
    n = mask.to(x.dtype).sum()
    if unbiased:
        return _safe_div(centered_sq.sum(), n - 1) * (n > 1).to(x.dtype)
    return _safe_div(centered_sq.sum(), n)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased variance over all masked positions.

    Masked positions of the result are 0.
    """
    x = _masked(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    return _masked((x - mean) * torch.rsqrt(var + eps), mask)


def last_valid_index(response_mask: Tensor) -> Tensor:
    """[B] column of each row's last valid token (0 for a row with none)."""
    cols = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return torch.where(response_mask.bool(), cols, torch.zeros_like(cols)).max(dim=-1).values


def critic_reward(values: Tensor, response_mask: Tensor) -> Tensor:
    """TEMPO's reward of a response: the critic's value read before its last valid token (raw, no
    sigmoid or clamp), [B]; 0 for a row without a valid token. The one place it is computed: the
    advantages, the logged unlabeled reward and the reward-drift monitor all take it from here."""
    last = last_valid_index(response_mask)
    value = values.gather(-1, last.unsqueeze(-1)).squeeze(-1)
    return torch.where(response_mask.bool().any(-1), value, torch.zeros_like(value))


def outcome_token_rewards(scores: Tensor, response_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """[B, L] token rewards for GAE: each row's score on its last valid token, 0 elsewhere (RLVR)."""
    rewards = torch.zeros(response_mask.shape, dtype=dtype, device=scores.device)
    rows = torch.arange(response_mask.shape[0], device=scores.device)
    rewards[rows, last_valid_index(response_mask)] = scores.to(rewards.dtype)
    return rewards


def em_token_advantages(
    values: Tensor,
    scores: Tensor,
    response_mask: Tensor,
    is_labeled: Tensor,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """TEMPO's token-level advantages (docs/algorithm.md, "Advantages").

    Args:
        values: [B, L] critic values; column t is V read before response token t.
        scores: [B] verified scores (+-1), used for labeled rows only.
        response_mask: [B, L] 1 on valid response tokens.
        is_labeled: [B] bool.
        eps: added to the variance in the whitening.

    Returns:
        advantages [B, L]: whiten(R_b - V_{b,t}) with one mean and unbiased variance over all valid
            tokens of the batch; 0 at masked positions.
        returns [B, L]: R_b on valid tokens, 0 elsewhere.

    R_b is the score for labeled rows and the row's last valid value (raw critic output: no sigmoid,
    no clamp) for unlabeled rows. No discounting.
    """
    if values.shape != response_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and response_mask {tuple(response_mask.shape)} differ")
    if scores.shape != values.shape[:1] or is_labeled.shape != values.shape[:1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and is_labeled {tuple(is_labeled.shape)} must be [B] = [{values.shape[0]}]"
        )
    # computed on the valid tokens only (a batch of long-tailed responses is mostly padding), in row-major
    # order, and scattered back: the same whitening as masked_whiten, a third of the memory traffic
    mask = response_mask.bool()
    labeled = is_labeled.bool()
    if labeled.all():  # R_b given for every row (the recipe's critic_reward): no critic read to throw away
        reward = scores.to(values.dtype)
    else:
        reward = torch.where(labeled, scores.to(values.dtype), critic_reward(values, response_mask).to(values.dtype))
    reward_tok = torch.repeat_interleave(reward, mask.sum(-1))
    raw = reward_tok - values[mask]
    n = raw.numel()
    if n > 1:
        mean = raw.mean()
        var = ((raw - mean) ** 2).sum() / (n - 1)
        whitened = (raw - mean) * torch.rsqrt(var + eps)
    else:  # masked_var's convention: fewer than two tokens have variance 0
        whitened = (raw - raw.mean()) * torch.rsqrt(torch.as_tensor(eps, dtype=raw.dtype)) if n else raw
    zeros = torch.zeros_like(values)
    return zeros.masked_scatter(mask, whitened), zeros.masked_scatter(mask, reward_tok)


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation for Stage-1 PPO (token-level rewards, the outcome reward on
    the last valid token).

    Masked positions are skipped: they neither bootstrap a value nor carry a TD error, so a mask with
    holes behaves like the same sequence with the holes removed. The value after the last token is 0.

    Returns (advantages whitened over valid tokens, returns = raw advantages + values), both 0 at
    masked positions.
    """
    if not (rewards.shape == values.shape == response_mask.shape):
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same [B, L] shape"
        )
    mask = response_mask.to(values.dtype)
    vals = _masked(values, response_mask)
    rews = _masked(rewards, response_mask)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    reversed_adv = []
    for t in reversed(range(values.shape[1])):
        delta = rews[:, t] + gamma * next_value - vals[:, t]
        candidate = delta + gamma * lam * running
        next_value = vals[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        running = candidate * mask[:, t] + (1 - mask[:, t]) * running
        reversed_adv.append(running)
    raw = torch.stack(reversed_adv[::-1], dim=1)
    returns = _masked(raw + vals, response_mask)
    return masked_whiten(raw, response_mask), returns
