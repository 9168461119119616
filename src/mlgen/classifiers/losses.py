"""Multi-label losses: Asymmetric Loss (ASL) and Multi-label Cluster Discrimination (MLCD)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_REDUCTIONS = ("sum", "mean")


def _asymmetric_loss_from_probs(
    probs: Tensor,
    targets: Tensor,
    gamma_neg: float,
    gamma_pos: float,
    clip: float,
    eps: float,
    reduction: str,
    focal_weight_grad: bool,
) -> Tensor:
    """ASL on probabilities, following Alibaba-MIIL/ASL `AsymmetricLoss.forward`.

    Soft targets (``--soft-targets``): the official code assumes a binary y ("pt = p if t > 0 else 1-p") but its
    formula is kept as it is for y in (0, 1): the cross-entropy is linear in y and the focusing interpolates (pt
    and gamma), with the focusing weight one factor on both parts, so gradient descent settles at p = y(1 + clip)
    (above clip): a soft target is matched, and a small one learns slowly, much as a negative. Reading y as a
    Bernoulli label instead (y x ASL(1) + (1 - y) x ASL(0)) would push a 0.3 target to p = 0.72, the negative
    focusing discounting its negative half; focusing on the hard label (0) would freeze p below clip.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if probs.shape != targets.shape:
        raise ValueError(f"shape mismatch: inputs {tuple(probs.shape)} vs targets {tuple(targets.shape)}")
    y = targets.to(probs.dtype)
    xs_pos = probs
    xs_neg = 1 - probs
    if clip > 0:  # probability shifting: only the negatives are clipped
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = xs_pos * y + xs_neg * (1 - y)
        gamma = gamma_pos * y + gamma_neg * (1 - y)
        w = torch.pow(1 - pt, gamma)
        if not focal_weight_grad:
            # the official default (disable_torch_grad_focal_loss=True): the weight carries no gradient. Detached
            # here instead of toggling the global grad mode (the official code's pitfall under no_grad)
            w = w.detach()
        loss = loss * w
    return -loss.sum() if reduction == "sum" else -loss.mean()


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    reduction: str = "sum",
    focal_weight_grad: bool = False,
) -> Tensor:
    """Asymmetric Loss (Ridnik et al., 2021) on logits; "sum" matches the official code.

    ``focal_weight_grad=False`` (default, as every official trainer): the focusing weight ``(1 - pt)^gamma`` is a
    constant in the backward pass; True backpropagates through it too (same value, larger negative gradient).
    """
    return _asymmetric_loss_from_probs(
        torch.sigmoid(logits),
        targets,
        gamma_neg,
        gamma_pos,
        clip,
        eps,
        reduction,
        focal_weight_grad,
    )


def asymmetric_loss_probs(
    probs: Tensor,
    targets: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    reduction: str = "sum",
    focal_weight_grad: bool = False,
) -> Tensor:
    """Asymmetric Loss on probabilities already in [0, 1] (e.g. softmax outputs)."""
    return _asymmetric_loss_from_probs(probs, targets, gamma_neg, gamma_pos, clip, eps, reduction, focal_weight_grad)


class AsymmetricLoss(nn.Module):
    """Module wrapper around :func:`asymmetric_loss` (input: logits)."""

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        reduction: str = "sum",
        focal_weight_grad: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.reduction = reduction
        self.focal_weight_grad = focal_weight_grad

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return asymmetric_loss(
            logits,
            targets,
            self.gamma_neg,
            self.gamma_pos,
            self.clip,
            self.eps,
            self.reduction,
            self.focal_weight_grad,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
            f"reduction={self.reduction!r}, focal_weight_grad={self.focal_weight_grad}"
        )


def _sample_negatives(negatives: Tensor, fraction: float, generator: torch.Generator | None) -> Tensor:
    """Random subset (about `fraction`) of each row's negatives, keeping at least one if any exist."""
    rand_device = generator.device if generator is not None else negatives.device
    r = torch.rand(negatives.shape, generator=generator, device=rand_device).to(negatives.device)
    sampled = (r < fraction) & negatives
    # guarantee one negative per row: the negative with the smallest random draw
    first = r.masked_fill(~negatives, math.inf).argmin(dim=1, keepdim=True)
    forced = torch.zeros_like(negatives).scatter_(1, first, True) & negatives
    return sampled | forced


def _log1p_sum_exp(values: Tensor, mask: Tensor) -> Tensor:
    """Row-wise log(1 + sum_{mask} exp(values)), computed stably via logsumexp with a 0 column."""
    masked = values.masked_fill(~mask, -math.inf)
    zeros = torch.zeros_like(values[:, :1])
    return torch.logsumexp(torch.cat([masked, zeros], dim=1), dim=1)


def mlcd_loss(
    embeddings: Tensor,
    centers: Tensor,
    positive_mask: Tensor,
    margin: float = 0.3,
    scale: float = 32.0,
    negative_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multi-label Cluster Discrimination loss (An et al., 2024, arXiv 2407.17331, Eq. 5).

    embeddings [N, D], centers [K, D], positive_mask [N, K] (bool). Positives get an
    ArcFace additive angular margin; a random `negative_fraction` of negatives is used.
    """
    if embeddings.ndim != 2 or centers.ndim != 2 or embeddings.shape[1] != centers.shape[1]:
        raise ValueError(
            f"expected embeddings [N, D] and centers [K, D], got {tuple(embeddings.shape)}, {tuple(centers.shape)}"
        )
    if positive_mask.shape != (embeddings.shape[0], centers.shape[0]):
        raise ValueError(f"positive_mask must have shape [N, K], got {tuple(positive_mask.shape)}")
    if not 0 < negative_fraction <= 1:
        raise ValueError(f"negative_fraction must be in (0, 1], got {negative_fraction}")
    cos = F.normalize(embeddings, dim=1) @ F.normalize(centers, dim=1).T
    return mlcd_cosine_loss(cos, positive_mask, margin, scale, negative_fraction, generator)


LOSSES = ("asl", "mlcd", "bce")
DUALCOOP_LOSS_WEIGHT = 0.01  # the official --loss_w: 0.01 x the SUM of ASL over batch and classes


def mlcd_cosine_loss(
    cosines: Tensor,
    positive_mask: Tensor,
    margin: float = 0.3,
    scale: float = 32.0,
    negative_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`mlcd_loss` from precomputed cosines [N, K] (normalised features vs normalised centres)."""
    pos = positive_mask.to(device=cosines.device, dtype=torch.bool)
    cos_margin = torch.cos(torch.acos(cosines.clamp(-1 + 1e-7, 1 - 1e-7)) + margin)
    s = scale * torch.where(pos, cos_margin, cosines)
    neg = _sample_negatives(~pos, negative_fraction, generator)
    return (_log1p_sum_exp(-s, pos) + _log1p_sum_exp(s, neg)).mean()


def mlcd_logit_loss(logits: Tensor, targets: Tensor, negative_fraction: float = 0.1) -> Tensor:
    """MLCD Eq. 5 on logits with negative sampling but no margin: for heads whose score is not one cosine
    between a normalised feature and a class weight (DualCoOp: a difference of two aggregated cosines; CPRFL: a
    raw dot product), where an angular margin has no angle to act on. Positives are the targets at 1: a soft
    target (between 0 and 1) is a negative, MLCD having no soft form (``--soft-targets`` refuses mlcd)."""
    pos = targets >= 1
    neg = _sample_negatives(~pos, negative_fraction, None)
    return (_log1p_sum_exp(-logits, pos) + _log1p_sum_exp(logits, neg)).mean()


def _with_reduction(loss, reduction: str):
    """Tag ``loss`` with how it reduces over samples (``reduction``: "sum" or "mean"), read by the trainer to
    weight each rank's share under data parallelism (a sum needs no weight)."""
    loss.reduction = reduction
    return loss


def make_loss(name: str, head: str = "linear", model: nn.Module | None = None):
    """``loss(logits, targets)``: ASL with the official settings for ``head``, MLCD, or plain BCE.

    DualCoOp: 0.01 x sum of ASL (gamma- 2, gamma+ 1, clip 0.05) over batch x classes, as the official trainer;
    the others: the mean of ASL (gamma- 4, gamma+ 0, clip 0.05). A summed loss has ``reduction == "sum"``.
    MLCD on the linear head (``model`` given): the margined :func:`mlcd_loss` on the head's cosines between
    normalised features and class weights (what its last forward computed); on the other heads (or without
    ``model``) :func:`mlcd_logit_loss`.
    """
    if name == "asl":
        if head == "dualcoop":
            return _with_reduction(
                lambda logits, targets: DUALCOOP_LOSS_WEIGHT * asymmetric_loss(logits, targets, 2.0, 1.0, 0.05), "sum"
            )
        return lambda logits, targets: asymmetric_loss(logits, targets, 4.0, 0.0, 0.05, reduction="mean")
    if name == "mlcd":
        if head == "linear" and model is not None:
            return lambda logits, targets: mlcd_cosine_loss(model.head.last_cosines, targets >= 1)
        return mlcd_logit_loss
    if name == "bce":
        return lambda logits, targets: F.binary_cross_entropy_with_logits(logits, targets.float())
    raise ValueError(f"unknown loss {name!r}: use one of {LOSSES}")
