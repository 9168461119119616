"""The CLIP discriminator of Diff-ZS-MLC: grouping softmax and the exact-set keep rule."""

from __future__ import annotations

import torch


def grouping_softmax(logits: torch.Tensor, requested: list[int]) -> torch.Tensor:
    """Per-class probabilities of one image from its CLIP logits over all classes.

    For each requested label r: a softmax over {r} and every class that was not requested (the
    other requested labels left out). r's probability is its value in its own group; a
    non-requested class's probability is its mean over the groups. Differentiable (the
    text-encoder fine-tuning backpropagates through it).
    """
    rows = torch.arange(len(requested), device=logits.device)
    index = torch.tensor(requested, device=logits.device)
    in_group = torch.ones(len(requested), logits.shape[-1], dtype=torch.bool, device=logits.device)
    in_group[:, index] = False  # the requested labels leave every group...
    in_group[rows, index] = True  # ...but their own
    group_probs = torch.softmax(logits.expand_as(in_group).masked_fill(~in_group, float("-inf")), dim=-1)
    # A requested label has a value in its own group only; the other classes in every group.
    members = in_group.sum(0).clamp(min=1)
    return group_probs.sum(0) / members


def detected_labels(probs: torch.Tensor, k: int, threshold: float) -> set[int]:
    """The top-``k`` classes whose probability is above ``threshold``."""
    top = torch.topk(probs, k)
    return {int(i) for p, i in zip(top.values, top.indices, strict=True) if p > threshold}


def keep(probs: torch.Tensor, requested: list[int], threshold: float) -> tuple[bool, set[int]]:
    """Keep an image only when the labels it shows are exactly the labels that were asked for."""
    found = detected_labels(probs, len(requested), threshold)
    return found == set(requested), found
