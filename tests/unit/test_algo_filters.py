"""Group filter (dynamic sampling) against hand-built groups."""

import pytest
import torch

from tempo_mega.algo.filters import filter_groups


def groups(spec):
    """spec: list of (labeled, scores) per group, samples laid out group after group."""
    scores, gids, lab = [], [], []
    for g, (is_lab, s) in enumerate(spec):
        scores += s
        gids += [g] * len(s)
        lab += [is_lab] * len(s)
    return torch.tensor(scores, dtype=torch.float32), torch.tensor(gids), torch.tensor(lab)


def test_drops_only_uniform_labeled_groups():
    s, g, lab = groups([
        (True, [1, 1, 1, 1]),     # all correct: dropped
        (True, [1, -1, 1, -1]),   # informative: kept
        (False, [0.2, 0.2, 0.2, 0.2]),  # unlabeled, uniform: never dropped
        (True, [-1, -1, -1, -1]),  # all wrong: dropped
        (False, [0.1, 0.5, 0.3, 0.0]),
    ])
    r = filter_groups(s, g, lab)
    assert r.keep.tolist() == [False] * 4 + [True] * 8 + [False] * 4 + [True] * 4
    assert (r.kept_groups, r.kept_labeled_groups, r.kept_unlabeled_groups, r.dropped_groups) == (3, 1, 2, 2)
    assert r.groups_needed == 0 and r.surplus_groups == 0


def test_target_reports_groups_needed_and_cuts_surplus_in_order():
    s, g, lab = groups([(True, [1, 1]), (True, [1, -1]), (False, [0, 0]), (True, [-1, 1]), (False, [1, 1])])
    short = filter_groups(s, g, lab, target_num_groups=6)
    assert short.kept_groups == 4 and short.groups_needed == 2
    cut = filter_groups(s, g, lab, target_num_groups=2)
    assert cut.keep.tolist() == [False, False, True, True, True, True, False, False, False, False]
    assert cut.kept_groups == 2 and cut.surplus_groups == 2 and cut.groups_needed == 0


def test_interleaved_groups_and_errors():
    scores = torch.tensor([1.0, 1.0, -1.0, 1.0])
    gids = torch.tensor([0, 1, 0, 1])
    r = filter_groups(scores, gids, torch.tensor([True] * 4))
    assert r.keep.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="mixes labeled and unlabeled"):
        filter_groups(scores, gids, torch.tensor([True, True, False, True]))
    with pytest.raises(ValueError, match=r"\[N\]"):
        filter_groups(scores, gids[:3], torch.tensor([True] * 4))


def test_target_zero_keeps_nothing_and_needs_nothing():
    """target_num_groups=0 is a target (not 'no target'): every informative group is surplus."""
    s, g, lab = groups([(True, [1, -1]), (False, [0.3, 0.3]), (True, [1, 1])])
    r = filter_groups(s, g, lab, target_num_groups=0)
    assert not r.keep.any()
    assert (r.kept_groups, r.surplus_groups, r.dropped_groups, r.groups_needed) == (0, 2, 1, 0)
    with pytest.raises(ValueError, match="target_num_groups"):
        filter_groups(s, g, lab, target_num_groups=-1)


def test_singleton_groups():
    """One sample per prompt: a labeled singleton has no spread (dropped), an unlabeled one is kept."""
    s, g, lab = groups([(True, [1]), (False, [0.4]), (True, [-1]), (False, [0.0])])
    r = filter_groups(s, g, lab)
    assert r.keep.tolist() == [False, True, False, True]
    assert (r.kept_groups, r.kept_unlabeled_groups, r.dropped_groups) == (2, 2, 2)
    r = filter_groups(s, g, lab, target_num_groups=1)
    assert r.keep.tolist() == [False, True, False, False] and r.surplus_groups == 1
