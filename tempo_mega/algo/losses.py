"""Policy and value losses: GSPO (TEMPO's M-step), sequence-clipped value loss (E-step), PPO.

Pure torch, differentiable, any float dtype. Inputs at masked positions are free (even NaN or -inf):
they are replaced by 0 before any arithmetic, so neither the loss nor its gradient sees them. All ``[B, L]`` inputs are aligned with
``response_mask``; each function returns ``(scalar loss, metrics)`` where metrics are python floats
computed without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tempo_mega.algo.advantages import _masked, _safe_div, masked_mean

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def row_means(x: Tensor, mask: Tensor) -> Tensor:
    """[B] mean of each row over its valid tokens (0 for a row with none)."""
    return _safe_div(_masked(x, mask).sum(-1), mask.to(x.dtype).sum(-1))


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str = "seq-mean-token-mean") -> Tensor:
    """Reduce a [B, L] token loss to a scalar.

    token-mean: mean over all valid tokens of the batch.
    seq-mean-token-mean: mean over rows of each row's token mean; rows with no valid token do not count.
    seq-mean-token-sum: mean over rows of each row's token sum; rows with no valid token do not count.
    """
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    rows_with_tokens = mask.sum(-1) > 0
    if mode == "seq-mean-token-mean":
        per_row = row_means(loss_mat, mask)
    elif mode == "seq-mean-token-sum":
        per_row = _masked(loss_mat, mask).sum(-1)
    else:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
    return masked_mean(per_row, rows_with_tokens)


def _f(x: Tensor) -> float:
    return float(x.detach())


def _clip_metrics(clipped: Tensor, advantages: Tensor, mask: Tensor) -> dict[str, float]:
    """Share of valid tokens where the clipped branch is active, in all and by the sign of A."""
    frac = lambda sel: _f(masked_mean(sel.to(advantages.dtype), mask))  # noqa: E731
    return {"clip_frac": frac(clipped), "clip_frac_low": frac(clipped & (advantages < 0)),
            "clip_frac_high": frac(clipped & (advantages > 0))}


def critic_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_range_value: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """TEMPO's E-step value loss with a *sequence-level* value clip (docs/algorithm.md, "E-step").

    delta_b = mean_t V_new - mean_t V_old over row b's valid tokens;
    V_clip = V_new + (clamp(delta_b, -c, c) - delta_b);
    token loss = max((V_new - R)^2, (V_clip - R)^2);
    loss = 0.5 * mean over rows (with valid tokens) of the row's token mean.

    Every row given counts: the caller selects the rows to fit (the controller passes only the labeled
    rows, ``batch.select(batch.is_labeled)``, except in the pseudo-reward modes TTRL / EMPO).
    """
    values, old_values, returns = (_masked(t, response_mask) for t in (values, old_values, returns))
    delta = row_means(values, response_mask) - row_means(old_values, response_mask)
    clipped_delta = delta.clamp(-clip_range_value, clip_range_value)
    values_clipped = values + (clipped_delta - delta).unsqueeze(-1)
    err_unclipped = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    token_loss = torch.maximum(err_unclipped, err_clipped)
    loss = 0.5 * agg_loss(token_loss, response_mask, "seq-mean-token-mean")

    with torch.no_grad():
        rows = response_mask.sum(-1) > 0
        metrics = {
            "value_mse": _f(masked_mean(err_unclipped, response_mask)),
            "value_clip_frac": _f(masked_mean((delta.abs() > clip_range_value).to(values.dtype), rows)),
            "clipped_loss_frac": _f(masked_mean((err_clipped > err_unclipped).to(values.dtype), response_mask)),
            "values_mean": _f(masked_mean(values, response_mask)),
            "returns_mean": _f(masked_mean(returns, response_mask)),
            "num_rows": float(rows.sum()),
        }
    return loss, metrics


def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 5e-4,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO with token-level advantages, as in TEMPO's released code (docs/algorithm.md, "M-step").

    s_b = mean_t(logp - old_logp) over valid tokens;
    lr_{b,t} = sg(s_b) + logp_{b,t} - sg(logp_{b,t}), clamped at most 10; ratio = exp(lr)
    (its value is the sequence ratio, its gradient flows per token);
    token loss = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high));
    loss = mean over rows (with valid tokens) of the row's token mean.
    """
    logprobs, old_logprobs, advantages = (_masked(t, response_mask) for t in (logprobs, old_logprobs, advantages))
    log_ratio = logprobs - old_logprobs
    seq_log_ratio = row_means(log_ratio, response_mask)
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()
    token_log_ratio = token_log_ratio.clamp(max=10.0)
    ratio = torch.exp(token_log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(loss_unclipped, loss_clipped)
    loss = agg_loss(token_loss, response_mask, "seq-mean-token-mean")

    with torch.no_grad():
        rows = response_mask.sum(-1) > 0
        seq_ratio = torch.exp(seq_log_ratio.clamp(max=10.0))
        metrics = {
            **_clip_metrics(loss_clipped > loss_unclipped, advantages, response_mask),
            "seq_clip_frac": _f(
                masked_mean(((seq_ratio < 1 - clip_low) | (seq_ratio > 1 + clip_high)).to(ratio.dtype), rows)
            ),
            "seq_ratio_mean": _f(masked_mean(seq_ratio, rows)),
            "approx_kl": _f(masked_mean(-log_ratio, response_mask)),
            "advantages_mean": _f(masked_mean(advantages, response_mask)),
            "num_rows": float(rows.sum()),
        }
    return loss, metrics


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Token-level PPO clip (Stage 1 and comparisons), with the dual clip of verl for A < 0.

    ratio_t = exp(clamp(logp - old_logp, -20, 20));
    token loss = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high)), and for A < 0 at most
    -A * clip_ratio_c (dual clip; None disables it); reduced by ``loss_agg_mode``.
    """
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 (or None), got {clip_ratio_c}")
    logprobs, old_logprobs, advantages = (_masked(t, response_mask) for t in (logprobs, old_logprobs, advantages))
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(loss_unclipped, loss_clipped)
    dual_clipped = torch.zeros_like(token_loss, dtype=torch.bool)
    if clip_ratio_c is not None:
        bound = -advantages * clip_ratio_c
        dual_clipped = (token_loss > bound) & (advantages < 0)
        token_loss = torch.where(advantages < 0, torch.minimum(token_loss, bound), token_loss)
    loss = agg_loss(token_loss, response_mask, loss_agg_mode)

    with torch.no_grad():
        metrics = {
            **_clip_metrics(loss_clipped > loss_unclipped, advantages, response_mask),
            "dual_clip_frac": _f(masked_mean(dual_clipped.to(ratio.dtype), response_mask)),
            "ratio_mean": _f(masked_mean(ratio, response_mask)),
            "approx_kl": _f(masked_mean(-log_ratio, response_mask)),
            "advantages_mean": _f(masked_mean(advantages, response_mask)),
            "num_rows": float((response_mask.sum(-1) > 0).sum()),
        }
    return loss, metrics


@dataclass(frozen=True)
class LossSpec:
    """A loss as the controller asks for it: an algo/ loss ``fn(output, *fields, mask, **kw)`` over the
    micro-batch fields named in ``fields``, how the backend weights micro-batches (``agg``: "seq" or
    "token"), and the name of the packed tempo_mega.kernels loss that equals it (None: none does). The
    backend fulfils it (``backends.base.bind_loss``): with the kernel where its ``use_kernels`` is on,
    with ``fn`` on the padded micro-batch otherwise."""

    fn: Callable
    fields: tuple[str, ...]
    agg: str = "seq"
    kernel: str | None = None
    kw: dict = field(default_factory=dict)
