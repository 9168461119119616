"""Standard (zero-shot) multi-label classification metrics: mAP and overall P/R/F1@k."""

from __future__ import annotations

import numpy as np


def _as_pair(scores: np.ndarray, targets: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and return (float scores, boolean positives)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have the same shape, got {scores.shape} vs {targets.shape}")
    if scores.ndim != ndim:
        raise ValueError(f"expected {ndim}-D arrays, got shape {scores.shape}")
    if scores.size == 0:
        raise ValueError("scores and targets must not be empty")
    return scores, targets > 0


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated AP for one class (as in ML-GCN/ASL `AveragePrecisionMeter`); nan without positives."""
    scores, positive = _as_pair(scores, targets, ndim=1)
    hits = positive[np.argsort(-scores, kind="stable")]
    if not hits.any():
        return float("nan")
    precision_at_rank = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision_at_rank[hits].mean())


def per_class_average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP of every class (columns of [N, C] arrays); nan for classes without positives."""
    scores, positive = _as_pair(scores, targets, ndim=2)
    return np.array([average_precision(scores[:, c], positive[:, c]) for c in range(scores.shape[1])])


# How a class with no positive image enters mAP: left out (sklearn's rule, mlgen's default) or counted as AP 0
# (the ``official`` rule of the ASL / Diff-ZS-MLC mAP helper, what the papers' tables used).
AP_RULES = ("sklearn", "official")


def mean_average_precision(scores: np.ndarray, targets: np.ndarray, ap_rule: str = "sklearn") -> float:
    """Mean AP over the classes that have at least one positive (nan if none has); ``ap_rule="official"``:
    a class without positives counts as AP 0 and stays in the mean."""
    if ap_rule not in AP_RULES:
        raise ValueError(f"unknown AP rule {ap_rule!r}: use one of {AP_RULES}")
    ap = per_class_average_precision(scores, targets)
    if ap_rule == "official":
        return float(np.nan_to_num(ap, nan=0.0).mean())
    valid = ~np.isnan(ap)
    return float(ap[valid].mean()) if valid.any() else float("nan")


def precision_recall_f1_at_k(scores: np.ndarray, targets: np.ndarray, k: int = 3) -> dict[str, float]:
    """Overall precision/recall/F1 of each image's top-k classes (BiAM, Diff-ZS-MLC protocol).

    Recall is 0 when there are no positive labels at all.
    """
    scores, positive = _as_pair(scores, targets, ndim=2)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, scores.shape[1])
    top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    true_positives = int(np.take_along_axis(positive, top_k, axis=1).sum())
    num_positives = int(positive.sum())
    precision = true_positives / (scores.shape[0] * k)
    recall = true_positives / num_positives if num_positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def evaluate_scores(scores: np.ndarray, targets: np.ndarray, k: int = 3, ap_rule: str = "sklearn") -> dict[str, float]:
    """mAP (by ``ap_rule``) and overall P/R/F1@k (fractions in [0, 1]) plus the number of images."""
    scores, positive = _as_pair(scores, targets, ndim=2)
    prf = precision_recall_f1_at_k(scores, positive, k)
    return {
        "mAP": mean_average_precision(scores, positive, ap_rule),
        f"precision@{k}": prf["precision"],
        f"recall@{k}": prf["recall"],
        f"f1@{k}": prf["f1"],
        "images": scores.shape[0],
    }


def threshold_metrics(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Per-class (CP, CR, CF1) and overall (OP, OR, OF1) precision/recall/F1 of ``probs >= threshold``.

    As in the ML-GCN / ASL evaluation: CP averages over all classes (a class never predicted has
    precision 0), CR over the classes that have positives.
    """
    probs, positive = _as_pair(probs, targets, ndim=2)
    predicted = probs >= threshold
    true_positive = (predicted & positive).sum(0)
    per_class_precision = np.divide(
        true_positive, predicted.sum(0), out=np.zeros(probs.shape[1]), where=predicted.any(0)
    )
    has_positive = positive.any(0)
    cp = float(per_class_precision.mean())
    cr = float((true_positive[has_positive] / positive.sum(0)[has_positive]).mean()) if has_positive.any() else 0.0
    op = float(true_positive.sum() / predicted.sum()) if predicted.any() else 0.0
    orecall = float(true_positive.sum() / positive.sum()) if positive.any() else 0.0

    def f1(p: float, r: float) -> float:
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orecall, "OF1": f1(op, orecall)}
