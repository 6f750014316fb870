"""algo/recipes.py and algo/correction.py against independent references: hand-computed cases, the
advantage estimators called directly, the pseudo-reward functions group by group, naive formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import tempo_mega.kernels as kernels
import torch

from tempo_mega.algo.advantages import (
    critic_reward,
    em_token_advantages,
    gae_advantages,
    outcome_token_rewards,
)
from tempo_mega.algo.correction import logprob_mismatch, truncated_is
from tempo_mega.algo.recipes import MODES, RECIPES, recipe, reward_range
from tempo_mega.backends.base import bind_loss
from tempo_mega.config import derive_prompt_split
from tempo_mega.rewards import empo_rewards, ttrl_rewards

ALGO = SimpleNamespace(clip_low=3e-4, clip_high=4e-4, ppo_clip_low=0.2, ppo_clip_high=0.28, clip_range_value=0.5)


def test_every_mode_has_a_recipe_and_an_unknown_one_names_the_key():
    assert set(MODES) == {"tempo", "rlvr", "ttrl", "empo", "supervised_continuation"}
    assert all(RECIPES[m].mode == m for m in MODES)
    with pytest.raises(ValueError, match="algo.mode"):
        recipe("grpo")


def test_the_table_says_what_the_paper_says():
    t, r = recipe("tempo"), recipe("rlvr")
    assert (t.labeled_prompts, t.unlabeled_prompts, t.unlabeled_reward, t.critic_rows) == (True, True, "critic", "labeled")
    assert (r.advantage, r.policy, r.unlabeled_prompts) == ("gae", "ppo", False)
    for m in ("ttrl", "empo"):  # pseudo-reward modes fit the critic on their own rewards, on unlabeled prompts only
        assert recipe(m).pseudo_reward and recipe(m).critic_rows == "all" and not recipe(m).labeled_prompts
    assert not recipe("supervised_continuation").unlabeled_prompts


@pytest.mark.parametrize("mode", MODES)
def test_prompt_counts_and_the_derived_zero_agree(mode):
    rec = recipe(mode)
    counts = rec.prompt_counts(3, 5)
    plain = {"algo": {"mode": mode, "labeled_prompts_per_step": 3, "unlabeled_prompts_per_step": 5}}
    derive_prompt_split(plain, explicit=set())
    assert counts == {"labeled": plain["algo"]["labeled_prompts_per_step"],
                      "unlabeled": plain["algo"]["unlabeled_prompts_per_step"]}
    unused = rec.unused_prompt_count()
    assert (unused is None) == (mode == "tempo")


def test_critic_reward_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert critic_reward(values, mask).tolist() == [2.0, 0.0, 9.0]


def test_outcome_token_rewards_by_hand():
    got = outcome_token_rewards(torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert got.tolist() == [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]


def _rows(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    scores = torch.tensor([1.0, -1.0, 0.0, 0.0])
    labeled = torch.tensor([True, True, False, False])
    return scores, values, mask, labeled


def test_tempo_rewards_unlabeled_rows_with_the_critic_and_keeps_verified_scores():
    scores, values, mask, labeled = _rows()
    got = recipe("tempo").critic_reward(scores, values, mask, labeled)
    assert got[:2].tolist() == [1.0, -1.0]
    assert got[2].item() == values[2, 0].item() and got[3].item() == values[3, 3].item()
    pseudo = torch.tensor([1.0, -1.0, 0.5, -0.5])
    assert recipe("ttrl").critic_reward(pseudo, values, mask, labeled) is pseudo  # already the reward


@pytest.mark.parametrize("mode", ["tempo", "ttrl", "supervised_continuation"])
def test_em_token_advantages_of_a_recipe_equal_the_estimator_called_directly(mode):
    scores, values, mask, labeled = _rows(1)
    if not recipe(mode).unlabeled_prompts:  # supervised_continuation samples labeled prompts only
        labeled = torch.ones_like(labeled)
    rec = recipe(mode)
    reward, adv, ret = rec.advantages(scores, values, mask, labeled, eps=1e-6)
    use_score = labeled if mode != "ttrl" else torch.ones_like(labeled)  # the controller's old rule
    want_adv, want_ret = em_token_advantages(values, scores, mask, use_score, eps=1e-6)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)
    assert reward.tolist() == want_ret.gather(1, torch.zeros(4, 1, dtype=torch.long)).squeeze(1).tolist()


def test_rlvr_is_gae_on_the_outcome_reward():
    scores, values, mask, labeled = _rows(2)
    _, adv, ret = recipe("rlvr").advantages(scores, values, mask, torch.ones_like(labeled))
    token = torch.zeros_like(values)
    for b, n in enumerate(mask.sum(1).tolist()):
        token[b, n - 1] = scores[b]
    want_adv, want_ret = gae_advantages(token, values, mask)
    torch.testing.assert_close(adv, want_adv, rtol=0, atol=0)
    torch.testing.assert_close(ret, want_ret, rtol=0, atol=0)


def test_group_rewards_equal_the_reward_functions_group_by_group():
    groups = [["\\boxed{1}", "\\boxed{1}", "\\boxed{2}"], ["\\boxed{3}", "no answer", "\\boxed{3}"]]
    ttrl = recipe("ttrl").group_rewards(groups, positive=1.0, negative=-1.0)
    assert ttrl == [ttrl_rewards(g, positive=1.0, negative=-1.0)[0] for g in groups]
    empo = recipe("empo").group_rewards(groups, positive=1.0, negative=-1.0)
    assert empo == [empo_rewards(g)[0] for g in groups]
    with pytest.raises(ValueError, match="no group reward"):
        recipe("tempo").group_rewards(groups, positive=1.0, negative=-1.0)


def test_reward_ranges():
    assert reward_range("empo", -1.0, 1.0) == (0.0, 1.0)
    assert recipe("tempo").reward_range(-1.0, 1.0) == (-1.0, 1.0)


def test_loss_specs_name_kernels_that_exist_and_bind_to_the_same_numbers():
    """The seam: a backend with kernels on trains with the packed kernel, off with the padded algo loss;
    both give the same loss (the kernels' own tests check them at more shapes)."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    mb = SimpleNamespace(response_mask=mask, old_logprobs=-torch.rand(2, 4, generator=g),
                         advantages=torch.randn(2, 4, generator=g), values=torch.randn(2, 4, generator=g),
                         returns=torch.randn(2, 4, generator=g))
    out = -torch.rand(2, 4, generator=g)
    for spec in (recipe("tempo").policy_loss(ALGO), recipe("tempo").critic_loss(ALGO)):
        assert callable(getattr(kernels, spec.kernel))
        plain, kern = bind_loss(spec, use_kernels=False), bind_loss(spec, use_kernels=True)
        assert plain.kernel is None and kern.kernel is getattr(kernels, spec.kernel)
        (a, ma), (b, mb_) = plain(out, mb), kern(out, mb)
        assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-7)
        assert ma == mb_
    ppo = recipe("rlvr").policy_loss(ALGO)
    assert ppo.kernel is None and bind_loss(ppo, use_kernels=True).kernel is None and ppo.agg == "token"
    plain_fn = lambda out, mb: (out.sum(), {})  # noqa: E731  a plain LossFn passes through
    assert bind_loss(plain_fn, use_kernels=True) is plain_fn


def test_logprob_mismatch_by_hand():
    a = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 0.0, 0.0]])
    b = torch.tensor([[0.1, -1.0, -9.0], [-0.2, 0.0, 5.0]])
    m = logprob_mismatch(a, b, torch.tensor([[1, 1, 0], [1, 1, 0]]))
    assert m["rollout/logprob_diff_max"] == pytest.approx(0.3)
    assert m["rollout/logprob_diff_mean"] == pytest.approx(0.1)
    assert logprob_mismatch(a, b, torch.zeros(2, 3)) == {}


@pytest.mark.parametrize("cap", [0.5, 1.0, 2.0])
def test_truncated_is_equals_the_naive_formula_on_valid_tokens(cap):
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    trainer, rollout = -torch.rand(3, 5, generator=g) * 2, -torch.rand(3, 5, generator=g) * 2
    adv = torch.randn(3, 5, generator=g)
    got, m = truncated_is(adv, trainer, rollout, mask, cap)
    valid = mask.bool()
    w = torch.exp(trainer - rollout)
    torch.testing.assert_close(got[valid], adv[valid] * torch.clamp(w[valid], max=cap))
    assert m["rollout/tis_weight_mean"] == pytest.approx(float(torch.clamp(w[valid], max=cap).mean()), rel=1e-6)
    assert m["rollout/tis_clip_frac"] == pytest.approx(float((w[valid] > cap).float().mean()))
    # weights exp(0) = 1, exp(1) -> capped, exp(-0.5): the hand case
    got, _ = truncated_is(torch.ones(1, 3), torch.tensor([[-1.0, -1.0, -3.5]]), torch.tensor([[-1.0, -2.0, -3.0]]),
                          torch.ones(1, 3), 2.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0, math.exp(-0.5)]]))
