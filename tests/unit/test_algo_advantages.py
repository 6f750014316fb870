"""Advantages against independent references: per-row python loops and hand-computed cases."""

import math
import statistics

import pytest
import torch

from tempo_mega.algo.advantages import (
    em_token_advantages,
    gae_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
)


def random_case(b=5, length=7, seed=0, dtype=torch.float64, labeled=None, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, length, generator=g, dtype=dtype)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    for r in empty_rows:
        lengths[r] = 0
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    scores = torch.where(torch.rand(b, generator=g) > 0.5, 1.0, -1.0).to(dtype)
    if labeled is None:
        is_labeled = torch.rand(b, generator=g) > 0.5
    else:
        is_labeled = torch.full((b,), labeled, dtype=torch.bool)
    return values, scores, mask, is_labeled


def reference_em_token(values, scores, mask, is_labeled, eps=1e-8):
    """Per-row loop in python floats, straight from docs/algorithm.md, "Advantages"."""
    b, length = values.shape
    raws, where = [], []
    returns = [[0.0] * length for _ in range(b)]
    for i in range(b):
        cols = [t for t in range(length) if mask[i, t]]
        if not cols:
            continue
        r = float(scores[i]) if bool(is_labeled[i]) else float(values[i, cols[-1]])
        for t in cols:
            raws.append(r - float(values[i, t]))
            where.append((i, t))
            returns[i][t] = r
    adv = [[0.0] * length for _ in range(b)]
    if raws:
        mean = sum(raws) / len(raws)
        var = statistics.variance(raws) if len(raws) > 1 else 0.0
        for (i, t), x in zip(where, raws):
            adv[i][t] = (x - mean) / math.sqrt(var + eps)
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def test_em_token_hand_computed():
    values = torch.tensor([[0.5, 0.2, 9.0], [0.1, 0.3, 0.6]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    scores = torch.tensor([1.0, -1.0], dtype=torch.float64)  # row 1's score is ignored: unlabeled
    is_labeled = torch.tensor([True, False])
    adv, ret = em_token_advantages(values, scores, mask, is_labeled)
    # raw = [[0.5, 0.8], [0.5, 0.3, 0.0]], mean 0.42, unbiased var 0.348 / 4
    std = math.sqrt(0.348 / 4 + 1e-8)
    expected = torch.tensor([[0.08, 0.38, 0.0], [0.08, -0.12, -0.42]], dtype=torch.float64) / std
    expected[0, 2] = 0.0
    torch.testing.assert_close(adv * mask, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret * mask, torch.tensor([[1.0, 1.0, 0.0], [0.6, 0.6, 0.6]], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("labeled", [None, True, False])
def test_em_token_matches_reference(seed, labeled):
    values, scores, mask, is_labeled = random_case(b=6, length=9, seed=seed, labeled=labeled)
    adv, ret = em_token_advantages(values, scores, mask, is_labeled)
    ref_adv, ref_ret = reference_em_token(values, scores, mask, is_labeled)
    torch.testing.assert_close(adv * mask, ref_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret * mask, ref_ret, atol=1e-12, rtol=0)


def test_em_token_all_labeled_returns_are_scores_and_unlabeled_uses_last_value():
    values, scores, mask, _ = random_case(b=4, length=6, seed=3)
    _, ret_l = em_token_advantages(values, scores, mask, torch.ones(4, dtype=torch.bool))
    _, ret_u = em_token_advantages(values, scores, mask, torch.zeros(4, dtype=torch.bool))
    lengths = mask.sum(-1)
    for i in range(4):
        assert torch.all(ret_l[i, : lengths[i]] == scores[i])
        assert torch.all(ret_u[i, : lengths[i]] == values[i, lengths[i] - 1])


def test_em_token_edge_rows_and_garbage_at_masked_positions():
    # a 1-token row, an all-masked row, NaN/inf at masked positions
    values, scores, mask, is_labeled = random_case(b=5, length=6, seed=11, empty_rows=(2,))
    mask[0] = 0
    mask[0, 0] = 1
    dirty = values.clone()
    dirty[mask == 0] = float("nan")
    dirty[4, -1] = float("inf") if mask[4, -1] == 0 else dirty[4, -1]
    dirty.requires_grad_(True)
    adv, ret = em_token_advantages(dirty, scores, mask, is_labeled)
    ref_adv, ref_ret = reference_em_token(values, scores, mask, is_labeled)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    torch.testing.assert_close(adv * mask, ref_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret * mask, ref_ret, atol=1e-12, rtol=0)
    assert torch.all(adv[2] == 0) and torch.all(ret[2] == 0)
    (adv.sum() + ret.sum()).backward()
    assert torch.isfinite(dirty.grad).all()


def test_em_token_single_valid_token_in_batch_is_finite():
    values = torch.tensor([[0.3, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0]])
    adv, ret = em_token_advantages(values, torch.tensor([1.0], dtype=torch.float64), mask, torch.tensor([True]))
    assert adv[0, 0] == 0.0 and ret[0, 0] == 1.0


def test_em_token_gradient_matches_reference_autograd():
    values, scores, mask, is_labeled = random_case(b=5, length=7, seed=5)
    v1 = values.clone().requires_grad_(True)
    adv, ret = em_token_advantages(v1, scores, mask, is_labeled)
    w = torch.randn_like(values)
    ((adv * w * mask).sum() + (ret * w * mask).sum()).backward()

    # independent: flat list of valid tokens, statistics by hand
    v2 = values.clone().requires_grad_(True)
    raws, rets = [], []
    for i in range(values.shape[0]):
        n = int(mask[i].sum())
        r = scores[i] if is_labeled[i] else v2[i, n - 1]
        for t in range(n):
            raws.append((r - v2[i, t], w[i, t]))
            rets.append(r * w[i, t])
    xs = torch.stack([x for x, _ in raws])
    ws = torch.stack([wt for _, wt in raws])
    mean = xs.sum() / len(xs)
    var = ((xs - mean) ** 2).sum() / (len(xs) - 1)
    (((xs - mean) / torch.sqrt(var + 1e-8) * ws).sum() + torch.stack(rets).sum()).backward()
    torch.testing.assert_close(v1.grad, v2.grad, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_em_token_low_precision(dtype):
    values, scores, mask, is_labeled = random_case(b=6, length=8, seed=2)
    adv, ret = em_token_advantages(values.to(dtype), scores.to(dtype), mask, is_labeled)
    assert adv.dtype == dtype and ret.dtype == dtype
    ref_adv, ref_ret = reference_em_token(values.to(dtype).double(), scores, mask, is_labeled)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(adv.double() * mask, ref_adv, atol=tol, rtol=tol)
    torch.testing.assert_close(ret.double() * mask, ref_ret, atol=tol, rtol=tol)


def test_em_token_rejects_bad_shapes():
    values, scores, mask, is_labeled = random_case()
    with pytest.raises(ValueError, match="response_mask"):
        em_token_advantages(values, scores, mask[:, :-1], is_labeled)
    with pytest.raises(ValueError, match="scores"):
        em_token_advantages(values, scores[:-1], mask, is_labeled)


def test_masked_mean_and_whiten_against_numpy_style_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 5, generator=g) > 0.4).long()
    mask[1] = 0
    sel = [float(x[i, j]) for i in range(4) for j in range(5) if mask[i, j]]
    assert float(masked_mean(x, mask)) == pytest.approx(sum(sel) / len(sel), abs=1e-12)
    per_row = masked_mean(x, mask, dim=-1)
    for i in range(4):
        row = [float(x[i, j]) for j in range(5) if mask[i, j]]
        assert float(per_row[i]) == pytest.approx(sum(row) / len(row) if row else 0.0, abs=1e-12)
    w = masked_whiten(x, mask)
    mean, sd = statistics.mean(sel), statistics.stdev(sel)
    for i in range(4):
        for j in range(5):
            want = (float(x[i, j]) - mean) / math.sqrt(sd**2 + 1e-8) if mask[i, j] else 0.0
            assert float(w[i, j]) == pytest.approx(want, abs=1e-9)
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


def reference_gae(rewards, values, mask, gamma, lam):
    """Standard GAE on each row's valid tokens only (holes removed), then whitening over all."""
    b, length = values.shape
    raw = [[0.0] * length for _ in range(b)]
    rets = [[0.0] * length for _ in range(b)]
    for i in range(b):
        cols = [t for t in range(length) if mask[i, t]]
        adv_next = 0.0
        for k in reversed(range(len(cols))):
            t = cols[k]
            v_next = float(values[i, cols[k + 1]]) if k + 1 < len(cols) else 0.0
            delta = float(rewards[i, t]) + gamma * v_next - float(values[i, t])
            adv_next = delta + gamma * lam * adv_next
            raw[i][t] = adv_next
            rets[i][t] = adv_next + float(values[i, t])
    flat = [raw[i][t] for i in range(b) for t in range(length) if mask[i, t]]
    mean, var = statistics.mean(flat), statistics.variance(flat)
    adv = [[(raw[i][t] - mean) / math.sqrt(var + 1e-8) if mask[i, t] else 0.0 for t in range(length)] for i in range(b)]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(rets, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_reference(gamma, lam, holes):
    values, scores, mask, _ = random_case(b=5, length=8, seed=7)
    if holes:
        mask[0, 1] = 0  # a hole inside a row is skipped, not bootstrapped through
    rewards = torch.zeros_like(values)
    for i in range(values.shape[0]):
        cols = mask[i].nonzero().flatten()
        rewards[i, cols[-1]] = scores[i]
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv * mask, ref_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret * mask, ref_ret, atol=1e-9, rtol=0)


def test_gae_with_gamma_lam_one_is_reward_minus_value():
    values, scores, mask, _ = random_case(b=3, length=5, seed=1)
    rewards = torch.zeros_like(values)
    lengths = mask.sum(-1)
    rewards[torch.arange(3), lengths - 1] = scores
    _, ret = gae_advantages(rewards, values, mask)
    for i in range(3):
        assert torch.allclose(ret[i, : lengths[i]], scores[i].expand(int(lengths[i])))


# ----------------------------------------------------------------------------- boundaries and defaults
def test_masked_var_two_valid_tokens_and_fewer():
    """Exactly two valid tokens: the unbiased variance (a - b)^2 / 2 ('n > 1' -> 'n > 2' gives 0);
    one or none: 0, not NaN."""
    x = torch.tensor([[3.0, float("nan"), 1.0]], dtype=torch.float64)
    assert float(masked_var(x, torch.tensor([[1, 0, 1]]))) == 2.0
    assert float(masked_var(x, torch.tensor([[1, 0, 0]]))) == 0.0
    assert float(masked_var(x, torch.tensor([[0, 0, 0]]))) == 0.0


def test_masked_var_biased_branch():
    """unbiased=False divides by n (torch.var(correction=0)); nothing in production calls it yet, so
    this is its only check."""
    values, _, mask, _ = random_case(b=4, length=6, seed=21)
    valid = values[mask.bool()]
    assert float(masked_var(values, mask, unbiased=False)) == pytest.approx(float(valid.var(correction=0)), abs=1e-12)
    assert float(masked_var(values, mask, unbiased=False)) < float(masked_var(values, mask))
    one = torch.tensor([[1, 0, 0, 0, 0, 0]] + [[0] * 6] * 3)
    assert float(masked_var(values, one, unbiased=False)) == 0.0
    assert float(masked_var(values, torch.zeros_like(mask), unbiased=False)) == 0.0


def test_masked_whiten_default_eps_is_used():
    """x = +-a with unbiased variance 2a^2 = 1e-8, the default eps: (x - 0) / sqrt(1e-8 + 1e-8) = +-0.5
    (without eps +-0.71, with 1e-7 +-0.21). A constant input (variance 0) gives 0, not 0 / 0."""
    a = math.sqrt(0.5e-8)
    x = torch.tensor([[a, -a, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[0.5, -0.5, 0.0]], dtype=torch.float64),
                               atol=1e-9, rtol=0)
    flat = masked_whiten(torch.full((2, 3), 0.25, dtype=torch.float64), torch.ones(2, 3))
    assert torch.equal(flat, torch.zeros(2, 3, dtype=torch.float64))
    # GAE whitens with this default too: equal rewards and values of one row give all-zero advantages
    adv, _ = gae_advantages(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64),
                            torch.ones(1, 3))
    assert torch.equal(adv, torch.zeros(1, 3, dtype=torch.float64))
