"""What the loss tests compare least: the log-ratio guards, the defaults production relies on, and the
training metrics users read (actor/clip_frac, actor/seq_clip_frac, actor/dual_clip_frac, actor/approx_kl,
critic/clipped_loss_frac, ...), each against a value computed by hand on a small batch with clipped and
unclipped rows, an empty row, a one-token row and both advantage signs.

Each test was checked to fail on the broken variant named in its docstring (scripts/mutation.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from tempo_mega.algo.losses import critic_loss, gspo_policy_loss, ppo_policy_loss

F64 = torch.float64


def padded(rows, width, fill=float("nan"), dtype=F64):
    """[B, width] tensor and its mask from ragged python rows; padding holds ``fill`` (garbage)."""
    x = torch.full((len(rows), width), fill, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, : len(row)] = 1
    return x, mask


# ----------------------------------------------------------------------------- log-ratio guards
@pytest.mark.parametrize("lr_sign", [1.0, -1.0], ids=["ratio_huge", "ratio_tiny"])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0], ids=["A>0", "A<0"])
def test_ppo_log_ratio_clamp_at_extreme_ratios(lr_sign, adv_sign):
    """log ratio +-100 in fp32: exp(100) overflows, so without the clamp to [-20, 20] the unused
    unclipped branch's gradient is 0 * inf = NaN. Beyond the clamp no gradient flows at all, and the
    clamp shows in approx_kl and ratio_mean."""
    logp = torch.full((1, 2), 100.0 * lr_sign, requires_grad=True)
    adv = torch.full((1, 2), adv_sign)
    loss, m = ppo_policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    r = math.exp(20.0 * lr_sign)
    # the branch taken, by hand (clip 0.2 both sides, dual clip 3 for A < 0)
    expected_loss, clipped = {
        (1.0, 1.0): (-1.2, "clip_frac_high"),  # clipped at 1 + 0.2
        (1.0, -1.0): (3.0, "dual_clip_frac"),  # the dual clip bounds -A * r
        (-1.0, 1.0): (-r, None),  # unclipped: -A * r
        (-1.0, -1.0): (0.8, "clip_frac_low"),  # clipped at 1 - 0.2
    }[lr_sign, adv_sign]
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6)
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # exactly 0: even exp(-100) would show
    if clipped:
        assert m[clipped] == 1.0
    assert m["approx_kl"] == -20.0 * lr_sign  # the mean of the clamped -log ratio
    assert m["ratio_mean"] == pytest.approx(r, rel=1e-6)


@pytest.mark.parametrize("lr_sign", [1.0, -1.0], ids=["ratio_huge", "ratio_tiny"])
@pytest.mark.parametrize("adv_sign", [1.0, -1.0], ids=["A>0", "A<0"])
def test_gspo_log_ratio_cap_at_extreme_ratios(lr_sign, adv_sign):
    """GSPO caps the (sequence) log ratio at 10 (no lower bound: exp(-100) is a tiny positive ratio).
    In fp32 a log ratio of 100 without the cap gives a NaN gradient through the unused branch."""
    logp = torch.full((1, 2), 100.0 * lr_sign, requires_grad=True)
    adv = torch.full((1, 2), adv_sign)
    loss, m = gspo_policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    r = math.exp(min(100.0 * lr_sign, 10.0))
    expected_loss, clipped = {
        (1.0, 1.0): (-(1 + 5e-4), "clip_frac_high"),
        (1.0, -1.0): (r, None),  # unclipped; capped, so no gradient
        (-1.0, 1.0): (-r, None),  # unclipped, r = exp(-100)
        (-1.0, -1.0): (1 - 3e-4, "clip_frac_low"),
    }[lr_sign, adv_sign]
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6, abs=1e-30)
    if clipped:
        assert m[clipped] == 1.0
    else:
        assert m["clip_frac"] == 0.0
    assert m["seq_clip_frac"] == 1.0
    assert m["seq_ratio_mean"] == pytest.approx(r, rel=1e-6, abs=1e-30)


# ----------------------------------------------------------------------------- defaults
def test_ppo_dual_clip_default_is_3_as_the_controller_calls_it():
    """Stage-1 PPO (algo.mode=rlvr) relies on clip_ratio_c's default: the rlvr recipe never passes it."""
    from tempo_mega.algo.recipes import recipe
    from tempo_mega.backends.base import bind_loss

    algo = SimpleNamespace(ppo_clip_low=0.2, ppo_clip_high=0.28)
    spec = recipe("rlvr").policy_loss(algo)
    assert spec.fn is ppo_policy_loss and spec.agg == "token" and "clip_ratio_c" not in spec.kw
    bound = bind_loss(spec, use_kernels=False)
    # token 0: ratio 5 with A = -1 -> -A * r = 5, dual-clipped to 3; token 1: ratio 1, A = -1 -> 1
    logp = torch.tensor([[math.log(5.0), 0.0]], dtype=F64)
    mb = SimpleNamespace(old_logprobs=torch.zeros(1, 2, dtype=F64), advantages=-torch.ones(1, 2, dtype=F64),
                         response_mask=torch.ones(1, 2))
    loss, m = bound(logp, mb)
    assert float(loss) == pytest.approx((3.0 + 1.0) / 2, abs=1e-12)
    assert m["dual_clip_frac"] == 0.5


def test_ppo_clip_ratio_c_bound_is_exactly_one():
    args = (torch.zeros(1, 1), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo_policy_loss(*args, clip_ratio_c=1.0)
    loss, _ = ppo_policy_loss(*args, clip_ratio_c=math.nextafter(1.0, 2.0))  # the smallest allowed
    assert float(loss) == pytest.approx(1.0)
    assert float(ppo_policy_loss(*args, clip_ratio_c=None)[0]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- PPO metrics
# ratios and advantages per row; row 2 is empty (garbage in its padding), rows 3 and 4 have one token
# (4 rows with tokens, 3 columns: a count over the wrong dim shows); 0 < A < 1 in rows 3 and 4
PPO_RATIOS = [[1.5, 1.1], [0.5, 4.0, 0.9], [], [0.5], [1.0]]
PPO_ADV = [[1.0, 1.0], [-1.0, -2.0, -1.0], [], [0.5], [0.5]]


def test_ppo_metrics_hand_computed():
    """Per token (clip 0.2, dual clip 3): (0,0) r 1.5 A+ clipped high, loss -1.2; (0,1) in range, -1.1;
    (1,0) r 0.5 A- clipped low, 0.8; (1,1) r 4 A=-2: unclipped 8 > clipped 2.4, dual-clipped to 6;
    (1,2) in range (clipped == unclipped: not counted), 0.9; (3,0) r 0.5 A=0.5: unclipped -0.25 wins;
    (4,0) r 1, -0.5. Kills: clip_frac '>' -> '>=' (the in-range ties), '&' -> '|' in the sign splits
    and dual clip, 'A < 0' -> 'A < 1' in the dual clip, approx_kl's sign, the row masks."""
    logp, mask = padded([[math.log(r) for r in row] for row in PPO_RATIOS], 3, fill=float("-inf"))
    adv, _ = padded(PPO_ADV, 3)
    loss, m = ppo_policy_loss(logp, torch.zeros_like(logp), adv, mask)
    ratios = [r for row in PPO_RATIOS for r in row]
    assert float(loss) == pytest.approx((-1.2 - 1.1 + 0.8 + 6.0 + 0.9 - 0.25 - 0.5) / 7, abs=1e-12)
    assert m["clip_frac"] == pytest.approx(2 / 7)
    assert m["clip_frac_low"] == pytest.approx(1 / 7)
    assert m["clip_frac_high"] == pytest.approx(1 / 7)
    assert m["dual_clip_frac"] == pytest.approx(1 / 7)
    assert m["approx_kl"] == pytest.approx(-sum(math.log(r) for r in ratios) / 7, abs=1e-12)
    assert m["approx_kl"] < 0  # the log ratios sum to +0.39 here: the sign is visible
    assert m["ratio_mean"] == pytest.approx(sum(ratios) / 7, abs=1e-12)
    assert m["advantages_mean"] == pytest.approx(-1 / 7, abs=1e-12)
    assert m["num_rows"] == 4.0


def test_ppo_dual_clip_frac_excludes_the_tie():
    """A ratio exactly at clip_ratio_c: -A r == -A c, not dual-clipped ('>' -> '>=' counts it)."""
    lr = torch.tensor([[1.25, 0.0]], dtype=F64)
    c = float(torch.exp(lr[0, 0]))  # the very ratio the loss computes
    _, m = ppo_policy_loss(lr, torch.zeros_like(lr), -torch.ones_like(lr), torch.ones(1, 2), clip_ratio_c=c)
    assert m["dual_clip_frac"] == 0.0


# ----------------------------------------------------------------------------- GSPO metrics
# token log ratios (old = 0) and advantages; row means: 0.01 (clipped high), -0.003 (clipped low),
# empty, 1e-4 (in range, one token), 0 (in range)
GSPO_LR = [[0.02, 0.0], [-0.003, -0.003, -0.003], [], [1e-4], [2e-4, -2e-4]]
GSPO_ADV = [[1.0, -1.0], [-1.0, 2.0, -0.5], [], [1.0], [1.0, -1.0]]


def test_gspo_metrics_hand_computed():
    """Row ratio r_b = exp(mean log ratio), clip [1 - 3e-4, 1 + 5e-4]. Clipped tokens: row 0's A > 0
    token (r > 1 + 5e-4), row 1's two A < 0 tokens (r < 1 - 3e-4); in-range rows tie, not counted.
    seq_clip_frac: rows 0 and 1 of the 4 rows with tokens. Kills: '|' -> '&', the row mask (empty row
    counted, or the one-token row dropped), approx_kl's sign, clip_frac '>' -> '>='."""
    logp, mask = padded(GSPO_LR, 3, fill=float("-inf"))
    adv, _ = padded(GSPO_ADV, 3)
    _, m = gspo_policy_loss(logp, torch.zeros_like(logp), adv, mask)
    seq = [sum(row) / len(row) for row in GSPO_LR if row]
    assert m["seq_clip_frac"] == pytest.approx(2 / 4)
    assert m["seq_ratio_mean"] == pytest.approx(sum(math.exp(s) for s in seq) / 4, abs=1e-12)
    assert m["clip_frac"] == pytest.approx(3 / 8)
    assert m["clip_frac_low"] == pytest.approx(2 / 8)
    assert m["clip_frac_high"] == pytest.approx(1 / 8)
    tokens = [x for row in GSPO_LR for x in row]
    assert m["approx_kl"] == pytest.approx(-sum(tokens) / 8, abs=1e-15)
    assert m["approx_kl"] < 0  # sum of log ratios > 0 here: the sign is visible
    assert m["advantages_mean"] == pytest.approx(sum(sum(r) for r in GSPO_ADV) / 8, abs=1e-12)
    assert m["num_rows"] == 4.0


def test_gspo_seq_clip_frac_bounds_are_inclusive():
    """Rows whose ratio is exactly 1 - clip_low or 1 + clip_high are in range (torch.clamp's closed
    interval), so seq_clip_frac is 0 ('<' -> '<=' or '>' -> '>=' counts them). For r in [0.5, 2],
    1 - (1 - r) and 1 + (r - 1) are exact in float64."""
    lr = torch.tensor([[-0.01], [0.01]], dtype=F64)
    r_low, r_high = (float(torch.exp(x)) for x in lr[:, 0])
    _, m = gspo_policy_loss(lr, torch.zeros_like(lr), torch.ones_like(lr), torch.ones(2, 1),
                            clip_low=1.0 - r_low, clip_high=r_high - 1.0)
    assert m["seq_clip_frac"] == 0.0
    assert m["clip_frac"] == 0.0


# ----------------------------------------------------------------------------- critic metrics
def test_critic_metrics_hand_computed():
    """clip 0.1 (the default). Rows: 0: delta 0.4, clipped to 0.1 (V_clip = V - 0.3), returns [1, 0]:
    token 0 takes the clipped error (1.0 > 0.49), token 1 the unclipped one (0.04 < 0.25);
    1: delta exactly 0.1, not clipped: equal errors, counted nowhere ('>' -> '>=' counts it twice);
    2: empty; 3: delta ~0: equal errors; 4 (one token): delta -1 -> -0.1, V_clip 0.4 vs return -1."""
    values, mask = padded([[0.3, 0.5], [0.1], [], [0.25, 0.2, 0.15], [-0.5]], 3)
    old, _ = padded([[0.0, 0.0], [0.0], [], [0.2, 0.2, 0.2], [0.5]], 3)
    returns, _ = padded([[1.0, 0.0], [1.0], [], [-1.0, -1.0, -1.0], [-1.0]], 3)
    loss, m = critic_loss(values, old, returns, mask)
    eu = [0.49, 0.25, 0.81, 1.5625, 1.44, 1.3225, 0.25]
    assert m["clipped_loss_frac"] == pytest.approx(2 / 7)
    assert m["value_clip_frac"] == pytest.approx(2 / 4)
    assert m["value_mse"] == pytest.approx(sum(eu) / 7, abs=1e-12)
    assert m["values_mean"] == pytest.approx((0.3 + 0.5 + 0.1 + 0.6 - 0.5) / 7, abs=1e-12)
    assert m["returns_mean"] == pytest.approx(-2 / 7, abs=1e-12)
    assert m["num_rows"] == 4.0
    row_losses = [(1.0 + 0.25) / 2, 0.81, (1.5625 + 1.44 + 1.3225) / 3, 1.96]
    assert float(loss) == pytest.approx(0.5 * sum(row_losses) / 4, abs=1e-12)
