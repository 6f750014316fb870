"""Losses against independent references: per-element python and analytic gradients."""

import math

import pytest
import torch

from tempo_mega.algo.losses import agg_loss, critic_loss, gspo_policy_loss, ppo_policy_loss


def make_case(b=6, length=8, seed=0, dtype=torch.float64, spread=1e-3, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    for r in empty_rows:
        lengths[r] = 0
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    old = -torch.rand(b, length, generator=g, dtype=dtype) * 3
    new = old + spread * torch.randn(b, length, generator=g, dtype=dtype)
    adv = torch.randn(b, length, generator=g, dtype=dtype)
    return new, old, adv, mask


# ----------------------------------------------------------------------------- GSPO
def reference_gspo(logp, old, adv, mask, cl, ch):
    """Value and analytic gradient per element, straight from docs/algorithm.md, "M-step"."""
    b, length = logp.shape
    rows = [i for i in range(b) if mask[i].sum() > 0]
    loss = 0.0
    grad = [[0.0] * length for _ in range(b)]
    for i in rows:
        cols = [t for t in range(length) if mask[i, t]]
        s = sum(float(logp[i, t]) - float(old[i, t]) for t in cols) / len(cols)
        lr = min(s, 10.0)
        r = math.exp(lr)
        r_clip = min(max(r, 1 - cl), 1 + ch)
        row = 0.0
        for t in cols:
            a = float(adv[i, t])
            unclipped, clipped = -a * r, -a * r_clip
            row += max(unclipped, clipped)
            # the unclipped branch carries -A * r per token; the clipped one is flat outside the range
            takes_unclipped = unclipped >= clipped
            inside = 1 - cl < r < 1 + ch
            g = -a * r if (takes_unclipped or inside) and s < 10.0 else 0.0
            grad[i][t] = g / len(cols) / len(rows)
        loss += row / len(cols)
    return loss / len(rows), torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spread", [1e-5, 3e-4, 1e-2])
def test_gspo_value_and_gradient_match_reference(seed, spread):
    new, old, adv, mask = make_case(seed=seed, spread=spread)
    logp = new.clone().requires_grad_(True)
    loss, metrics = gspo_policy_loss(logp, old, adv, mask)
    loss.backward()
    ref_loss, ref_grad = reference_gspo(new, old, adv, mask, 3e-4, 5e-4)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-9)
    torch.testing.assert_close(logp.grad * mask, ref_grad, atol=1e-9, rtol=0)
    assert 0.0 <= metrics["clip_frac_low"] <= metrics["clip_frac"] <= 1.0
    assert metrics["clip_frac"] == pytest.approx(metrics["clip_frac_low"] + metrics["clip_frac_high"])


def test_gspo_ratio_is_the_sequence_ratio_for_every_token():
    # with A = -1 on every token, loss of a row = ratio (in range), and every token shares it
    old = torch.zeros(1, 4, dtype=torch.float64)
    new = torch.tensor([[1e-4, -1e-4, 2e-4, 1e-4]], dtype=torch.float64)
    mask = torch.ones(1, 4)
    loss, m = gspo_policy_loss(new, old, -torch.ones(1, 4, dtype=torch.float64), mask)
    assert float(loss) == pytest.approx(math.exp(0.75e-4), abs=1e-12)
    assert m["seq_ratio_mean"] == pytest.approx(math.exp(0.75e-4), abs=1e-12)
    assert m["clip_frac"] == 0.0


def test_gspo_clipping_directions_and_log_ratio_cap():
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3)
    new = torch.full((2, 3), 0.01, dtype=torch.float64)  # ratio above 1 + 5e-4
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    loss, m = gspo_policy_loss(new.clone().requires_grad_(True), old, adv, mask)
    # A > 0 row is clipped at 1 + 5e-4; A < 0 row takes the unclipped ratio
    assert loss.item() == pytest.approx(0.5 * (-(1 + 5e-4) + math.exp(0.01)), abs=1e-12)
    assert m["clip_frac_high"] == pytest.approx(0.5) and m["clip_frac_low"] == 0.0
    # the log-ratio is capped at 10
    huge = torch.full((1, 2), 50.0, dtype=torch.float64, requires_grad=True)
    loss, _ = gspo_policy_loss(huge, torch.zeros(1, 2, dtype=torch.float64), -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2))
    assert float(loss) == pytest.approx(math.exp(10.0))
    loss.backward()
    assert torch.all(huge.grad == 0)


def test_gspo_empty_rows_do_not_count_and_garbage_is_ignored():
    new, old, adv, mask = make_case(empty_rows=(1, 4), spread=1e-3)
    dirty = new.clone()
    dirty[mask == 0] = float("-inf")
    logp = dirty.clone().requires_grad_(True)
    loss, _ = gspo_policy_loss(logp, old, adv, mask)
    loss.backward()
    ref_loss, ref_grad = reference_gspo(new, old, adv, mask, 3e-4, 5e-4)
    assert float(loss) == pytest.approx(ref_loss, abs=1e-9)
    assert torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad * mask, ref_grad, atol=1e-9, rtol=0)


def test_gspo_all_masked_is_zero_with_finite_grad():
    new, old, adv, mask = make_case()
    logp = new.clone().requires_grad_(True)
    loss, _ = gspo_policy_loss(logp, old, adv, torch.zeros_like(mask))
    loss.backward()
    assert float(loss) == 0.0 and torch.all(logp.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gspo_low_precision(dtype):
    new, old, adv, mask = make_case(seed=3, spread=1e-3)
    loss, _ = gspo_policy_loss(new.to(dtype), old.to(dtype), adv.to(dtype), mask)
    ref, _ = reference_gspo(new.to(dtype).double(), old.to(dtype).double(), adv.to(dtype).double(), mask, 3e-4, 5e-4)
    assert loss.dtype == dtype
    assert float(loss) == pytest.approx(ref, abs=2e-2 if dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------- critic
def reference_critic(values, old, returns, mask, c):
    """Per-row loop with its own autograd graph, from docs/algorithm.md, "E-step"."""
    total, rows = 0.0, 0
    for i in range(values.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        v, vo, r = values[i, :n], old[i, :n], returns[i, :n]
        delta = v.sum() / n - vo.sum() / n
        vclip = v + (torch.clamp(delta, -c, c) - delta)
        per_token = torch.stack([torch.maximum((v[t] - r[t]) ** 2, (vclip[t] - r[t]) ** 2) for t in range(n)])
        total = total + per_token.sum() / n
        rows += 1
    return 0.5 * total / rows


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("spread", [0.01, 0.5])
def test_critic_loss_value_and_gradient_match_reference(seed, spread):
    new, old, _, mask = make_case(seed=seed, spread=spread)
    g = torch.Generator().manual_seed(seed + 100)
    returns = torch.where(torch.rand(new.shape[0], 1, generator=g) > 0.5, 1.0, -1.0).double().expand_as(new)
    v1 = new.clone().requires_grad_(True)
    loss, metrics = critic_loss(v1, old, returns, mask, clip_range_value=0.1)
    loss.backward()
    v2 = new.clone().requires_grad_(True)
    ref = reference_critic(v2, old, returns, mask, 0.1)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), abs=1e-12)
    torch.testing.assert_close(v1.grad * mask, v2.grad * mask, atol=1e-12, rtol=0)
    if spread == 0.5:
        assert metrics["value_clip_frac"] > 0


def test_critic_loss_hand_computed():
    # one row, two tokens: V_old = [0, 0], V_new = [0.3, 0.5] -> delta 0.4, clipped to 0.1
    # V_clip = V_new - 0.3 = [0.0, 0.2]; returns 1: max(0.49, 1.0) = 1.0, max(0.25, 0.64) = 0.64
    v = torch.tensor([[0.3, 0.5]], dtype=torch.float64)
    loss, m = critic_loss(v, torch.zeros_like(v), torch.ones_like(v), torch.ones(1, 2))
    assert float(loss) == pytest.approx(0.5 * (1.0 + 0.64) / 2, abs=1e-12)
    assert m["value_clip_frac"] == 1.0
    assert m["value_mse"] == pytest.approx((0.49 + 0.25) / 2)


def test_critic_loss_rows_without_tokens_do_not_count():
    new, old, _, mask = make_case(seed=9, spread=0.05, empty_rows=(0, 3))
    returns = torch.ones_like(new)
    loss, m = critic_loss(new, old, returns, mask)
    keep = mask.sum(-1) > 0
    loss_kept, _ = critic_loss(new[keep], old[keep], returns[keep], mask[keep])
    assert float(loss) == pytest.approx(float(loss_kept), abs=1e-12)
    assert m["num_rows"] == float(keep.sum())


# ----------------------------------------------------------------------------- PPO
def reference_ppo_token_loss(logp, old, adv, cl, ch, c):
    lr = max(min(logp - old, 20.0), -20.0)
    r = math.exp(lr)
    loss = max(-adv * r, -adv * min(max(r, 1 - cl), 1 + ch))
    if adv < 0 and c is not None:
        loss = min(loss, -adv * c)
    return loss


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip_ratio_c", [3.0, None])
def test_ppo_matches_reference(mode, clip_ratio_c):
    new, old, adv, mask = make_case(seed=4, spread=1.5, empty_rows=(2,))
    logp = new.clone().requires_grad_(True)
    loss, m = ppo_policy_loss(logp, old, adv * 3, mask, clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c, loss_agg_mode=mode)
    per_row = []
    for i in range(new.shape[0]):
        toks = [
            reference_ppo_token_loss(float(new[i, t]), float(old[i, t]), 3 * float(adv[i, t]), 0.2, 0.28, clip_ratio_c)
            for t in range(new.shape[1])
            if mask[i, t]
        ]
        per_row.append(toks)
    if mode == "token-mean":
        flat = [x for r in per_row for x in r]
        ref = sum(flat) / len(flat)
    elif mode == "seq-mean-token-mean":
        ref = sum(sum(r) / len(r) for r in per_row if r) / sum(1 for r in per_row if r)
    else:
        ref = sum(sum(r) for r in per_row if r) / sum(1 for r in per_row if r)
    assert float(loss) == pytest.approx(ref, abs=1e-10)
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    if clip_ratio_c is not None:
        assert m["dual_clip_frac"] > 0  # ratios above 3 with A < 0 occur at this spread


def test_ppo_gradient_matches_finite_differences():
    new, old, adv, mask = make_case(seed=8, spread=0.3)
    logp = new.clone().requires_grad_(True)
    torch.autograd.gradcheck(
        lambda x: ppo_policy_loss(x, old, adv, mask, loss_agg_mode="seq-mean-token-mean")[0], (logp,), eps=1e-7, atol=1e-6
    )


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        agg_loss(torch.zeros(2, 2), torch.ones(2, 2), "mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), clip_ratio_c=0.5)


def test_gspo_loss_is_positively_homogeneous_in_the_advantage():
    """What the controller's truncated-IS correction relies on: scaling A by w > 0 per token scales
    each token's loss (and its gradient) by w."""
    new, old, adv, mask = make_case(seed=12, spread=1e-2)
    w = 0.5 + torch.rand(new.shape, generator=torch.Generator().manual_seed(1), dtype=new.dtype)
    lp1 = new.clone().requires_grad_(True)
    loss_scaled, _ = gspo_policy_loss(lp1, old, adv * w, mask)
    loss_scaled.backward()
    # reference: per-token losses with the plain advantage, weighted by w, aggregated the same way
    lp2 = new.clone().requires_grad_(True)
    s = ((lp2 - old) * mask).sum(-1) / mask.sum(-1)
    ratio = torch.exp((s.detach()[:, None] + lp2 - lp2.detach()).clamp(max=10.0))
    tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 3e-4, 1 + 5e-4)) * w
    ref = ((tok * mask).sum(-1) / mask.sum(-1)).mean()
    ref.backward()
    assert loss_scaled.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(lp1.grad * mask, lp2.grad * mask, atol=1e-12, rtol=0)
