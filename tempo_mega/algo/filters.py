"""Dynamic sampling: keep informative labeled groups, never drop unlabeled ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupFilterResult:
    keep: Tensor  # [N] bool, samples to train on (surplus groups beyond the target already cut)
    kept_groups: int  # groups in ``keep``
    kept_labeled_groups: int
    kept_unlabeled_groups: int
    dropped_groups: int  # labeled groups whose scores were all equal
    surplus_groups: int  # informative groups cut because the target was already reached
    groups_needed: int  # how many more kept groups the caller must generate to reach the target


def filter_groups(
    scores: Tensor,
    group_ids: Tensor,
    is_labeled: Tensor,
    target_num_groups: int | None = None,
) -> GroupFilterResult:
    """Drop labeled groups whose scores are all equal (they carry no learning signal); keep every
    unlabeled group. With ``target_num_groups``, keep only the first that many surviving groups in
    order of first appearance (cut the surplus) and report how many are still missing.

    Args:
        scores: [N] per-sample scores.
        group_ids: [N] the prompt each sample came from; samples of a group need not be contiguous.
        is_labeled: [N] bool, constant within a group.
    """
    n = scores.shape[0]
    if group_ids.shape != (n,) or is_labeled.shape != (n,):
        raise ValueError(
            f"filter_groups: scores {tuple(scores.shape)}, group_ids {tuple(group_ids.shape)} and "
            f"is_labeled {tuple(is_labeled.shape)} must all be [N]"
        )
    if target_num_groups is not None and target_num_groups < 0:
        raise ValueError(f"filter_groups: target_num_groups must be >= 0, got {target_num_groups}")
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    labeled = is_labeled.bool()
    kept = kept_labeled = kept_unlabeled = dropped = surplus = 0
    # groups in order of first appearance, so the surplus cut keeps the earliest prompts
    order = []
    seen = set()
    for g in group_ids.tolist():
        if g not in seen:
            seen.add(g)
            order.append(g)
    for g in order:
        members = group_ids == g
        group_labeled = labeled[members]
        if bool(group_labeled.any()) != bool(group_labeled.all()):
            raise ValueError(f"filter_groups: group {g} mixes labeled and unlabeled samples")
        is_lab = bool(group_labeled[0])
        if is_lab:
            s = scores[members]
            if bool((s == s[0]).all()):
                dropped += 1
                continue
        if target_num_groups is not None and kept >= target_num_groups:
            surplus += 1
            continue
        keep |= members
        kept += 1
        kept_labeled += int(is_lab)
        kept_unlabeled += int(not is_lab)
    needed = max(0, target_num_groups - kept) if target_num_groups is not None else 0
    return GroupFilterResult(keep, kept, kept_labeled, kept_unlabeled, dropped, surplus, needed)
