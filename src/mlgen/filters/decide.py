"""Whole-run filter decisions: the NUS-WIDE top-k rule, the teacher's per-label reliability, and the fallback.

The COCO rule (:func:`mlgen.filters.discriminator.exact_set_keep`) decides each image alone. What this
module adds needs every image of the run at once: how well the teacher's score for a label separates
the images generated for it from the others (AUROC, no annotation needed), and which images to add
back when a rule would leave a label with too few.
"""

from __future__ import annotations

import math

import torch
from scipy.stats import rankdata
from torch import Tensor

OFFICIAL_TOPK = 7  # NUS-WIDE's script: the top-7 of its 81 labels
OFFICIAL_CLASSES = 81
EXTRA_THRESHOLD = 0.1  # NUS-WIDE's script: another top-k label above this becomes a positive


def auto_topk(num_classes: int, requested: Tensor) -> Tensor:
    """k per image [N] for ``--topk 0``: the official 7-of-81 share of the label list, but at least one more
    than the image's requested labels (with 4 labels, top-7 would keep everything), and at most every label."""
    share = math.ceil(OFFICIAL_TOPK * num_classes / OFFICIAL_CLASSES)
    return (requested.sum(-1) + 1).clamp(min=share).clamp(max=num_classes)


def rule_topk(topk: int | None, columns: int, requested: Tensor) -> int | Tensor:
    """k of the top-k rule: ``topk`` when set, else :func:`auto_topk` of ``columns``, EVERY column the rule could
    rank (the run's labels and the competitors), gated or not: gating a label changes what is ranked, never k
    (the official script's k is 7 whatever it ranks)."""
    return topk or auto_topk(columns, requested)


def parents_of(labels: list[str], parents: dict[str, list[str]], known: set[str] | dict) -> list[str]:
    """``labels`` followed by the parent of each label that has one (``parents``: parent -> children), each once
    and only if the parent is a label of the run, as the official NUS-WIDE script adds its class relationship."""
    out = list(labels)
    for parent, children in parents.items():
        if parent in known and parent not in out and any(label in children for label in labels):
            out.append(parent)
    return out


def topk_keep(
    probs: Tensor, requested: Tensor, k: int | Tensor, extra_threshold: float = EXTRA_THRESHOLD
) -> tuple[Tensor, Tensor]:
    """The NUS-WIDE rule: (kept [N], training labels [N, C]).

    An image is kept when every requested label is among its top-k classes; every OTHER class of
    its top-k with probability above ``extra_threshold`` is added to its labels as a positive.
    """
    requested = requested.to(device=probs.device, dtype=torch.bool)
    k = torch.as_tensor(k, device=probs.device).expand(probs.shape[0])
    order = torch.argsort(probs, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(probs.shape[-1], device=probs.device).expand_as(order)
    )
    in_top = ranks < k[:, None]
    kept = (in_top | ~requested).all(-1)
    labels = requested | (in_top & (probs > extra_threshold))
    return kept, labels


def auroc(scores: Tensor, positives: Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` [N] for the bool ``positives`` [N] (ties count half);
    None when either side is empty."""
    positives = positives.bool().cpu()
    count, others = int(positives.sum()), int((~positives).sum())
    if count == 0 or others == 0:
        return None
    ranks = torch.from_numpy(rankdata(scores.float().cpu().numpy()))
    return float((ranks[positives].sum() - count * (count + 1) / 2) / (count * others))


def column_aurocs(scores: Tensor, requested: Tensor) -> list[float | None]:
    """The AUROC of each column of ``scores`` [N, C] between the images requested with it and the rest."""
    return [auroc(scores[:, c], requested[:, c]) for c in range(scores.shape[1])]


def fallback(kept: Tensor, requested: Tensor, probs: Tensor, min_keep: float, usable: Tensor) -> Tensor:
    """bool [N]: images to add back so that every label keeps at least ``min_keep`` of its generated images
    (He et al. 2023: no class emptied), each label's most confident dropped images first.

    ``usable`` [N] marks the images that may be added (not corrupt, not duplicates). Labels are
    served from the emptiest up; an image added for one label counts for its other labels too.
    """
    added = torch.zeros_like(kept)
    if min_keep <= 0:
        return added
    requested = requested.bool()
    generated = requested.sum(0)
    share = (kept[:, None] & requested).sum(0) / generated.clamp(min=1)
    for label in torch.argsort(share, stable=True).tolist():
        need = math.ceil(min_keep * int(generated[label])) - int(((kept | added) & requested[:, label]).sum())
        if need <= 0:
            continue
        candidates = (requested[:, label] & ~kept & ~added & usable).nonzero().flatten()
        best = candidates[torch.argsort(probs[candidates, label], descending=True, stable=True)[:need]]
        added[best] = True
    return added


def prototype_cosines(unit: Tensor, columns: Tensor, requested: Tensor, weight: float) -> Tensor:
    """[N, C]: cos(u_i, normalise((1 - w) t_c + w normalise(p_ic))) for image embeddings ``unit`` [N, D], each
    label's unit text column t_c (``columns`` [C, D]) and p_ic the mean embedding of the images requested with
    label c, LEAVE-ONE-OUT: an image never sees itself in the prototype of a label it asked for. Where no other
    image asked for c, the text column alone.

    From sums, no loop over images: with m = S_c - [i asked c] u_i (p_ic up to a positive factor),
    u.v = (1 - w) u.t + w u.m / |m| and |v|^2 = (1 - w)^2 + w^2 + 2 w (1 - w) t.m / |m| (float64: S_c grows
    with the run, m is a difference of sums).
    """
    u = unit.double()
    t = torch.nn.functional.normalize(columns.double(), dim=-1)
    asked = requested.to(device=u.device, dtype=torch.float64)
    sums = asked.T @ u  # [C, D]: S_c
    own = (u * u).sum(-1, keepdim=True)  # [N, 1]: |u_i|^2
    image_sum = u @ sums.T  # [N, C]: u_i . S_c
    image_text = u @ t.T  # [N, C]: u_i . t_c
    u_m = image_sum - asked * own
    t_m = (t * sums).sum(-1) - asked * image_text
    m_norm = ((sums * sums).sum(-1) - 2 * asked * image_sum + asked * own).clamp(min=0).sqrt()
    others = asked.sum(0) - asked  # [N, C]: the images in i's prototype of c
    m_norm = torch.where(others > 0, m_norm, torch.ones_like(m_norm))  # no prototype: divided, then discarded
    blended = ((1 - weight) * image_text + weight * u_m / m_norm) / (
        ((1 - weight) ** 2 + weight**2 + 2 * weight * (1 - weight) * t_m / m_norm).clamp(min=1e-12).sqrt()
    )
    return torch.where(others > 0, blended, image_text).to(unit.dtype)
