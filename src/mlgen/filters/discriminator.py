"""The CLIP discriminator of Diff-ZS-MLC: grouping softmax and the exact-set keep rule, batched.

Both work on whole batches (N images x C classes) so the filter stage and the text-encoder
fine-tuning (which backpropagates through :func:`grouping_softmax`) share one implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grouping_softmax(logits: Tensor, requested: Tensor) -> Tensor:
    """Per-class probabilities [N, C] from CLIP logits [N, C] and the requested labels (bool [N, C]).

    For each requested label r of an image: a softmax over {r} and every class that was not
    requested (the other requested labels left out). r's probability is its value in its own
    group; a non-requested class's probability is its mean over the image's groups. An image with
    no requested label gets a plain softmax. Differentiable.

    Closed form, O(N*C): with S = sum of exp(logit) over the non-requested classes, r's group has
    the denominator exp(l_r) + S, so everything follows from one log-sum-exp per image.
    """
    requested = requested.to(device=logits.device, dtype=torch.bool)
    if logits.shape != requested.shape or logits.ndim != 2:
        raise ValueError(
            f"expected logits and requested of the same [N, C] shape, got {logits.shape}, {requested.shape}"
        )
    lowest = torch.finfo(logits.dtype).min  # finite, so rows with every class requested keep finite gradients
    log_rest = torch.logsumexp(logits.masked_fill(requested, lowest), dim=-1, keepdim=True)
    log_denominator = torch.logaddexp(logits, log_rest)  # of the group headed by each class
    own_group = torch.exp(logits - log_denominator)
    count = requested.sum(-1, keepdim=True)
    # log of mean_r 1 / denominator_r over the requested labels r
    log_mean_inverse = torch.logsumexp((-log_denominator).masked_fill(~requested, lowest), dim=-1, keepdim=True)
    log_mean_inverse = log_mean_inverse - torch.log(count.clamp(min=1).to(logits.dtype))
    # masked before exp: an overflowing unselected branch of torch.where would still poison the gradient
    others = torch.exp((logits + log_mean_inverse).masked_fill(requested, 0.0))
    probs = torch.where(requested, own_group, others)
    return torch.where(count > 0, probs, torch.softmax(logits, dim=-1))


def detected(probs: Tensor, requested: Tensor, threshold: float = 0.5) -> Tensor:
    """bool [N, C]: the top-k classes of each image (k = its number of requested labels) above ``threshold``."""
    k = requested.sum(-1, keepdim=True)
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(probs.shape[-1], device=probs.device).expand_as(order)
    )
    return (ranks < k) & (probs > threshold)


def exact_set_keep(probs: Tensor, requested: Tensor, threshold: float = 0.5) -> Tensor:
    """bool [N]: keep an image only when the labels it shows are exactly the labels that were asked for."""
    requested = requested.to(device=probs.device, dtype=torch.bool)
    return (detected(probs, requested, threshold) == requested).all(-1)


def requested_mask(label_lists: list[list[int]], num_classes: int, device: torch.device | None = None) -> Tensor:
    """bool [N, C] from each image's requested class indices."""
    mask = torch.zeros(len(label_lists), num_classes, dtype=torch.bool, device=device)
    for row, labels in enumerate(label_lists):
        mask[row, labels] = True
    return mask


# One image at a time (kept for callers that score a single row).


def grouping_softmax_one(logits: Tensor, requested: list[int]) -> Tensor:
    """:func:`grouping_softmax` of one image: logits [C], requested class indices."""
    return grouping_softmax(logits[None], requested_mask([requested], logits.shape[-1], logits.device))[0]


def keep(probs: Tensor, requested: list[int], threshold: float) -> tuple[bool, set[int]]:
    """(kept, detected class indices) of one image under the exact-set rule."""
    mask = requested_mask([requested], probs.shape[-1], probs.device)
    found = detected(probs[None], mask, threshold)[0]
    indices = {int(i) for i in found.nonzero().flatten()}
    return indices == set(requested), indices
