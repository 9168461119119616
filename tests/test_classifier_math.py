"""Math checks for the multi-label losses, metrics and the linear head trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlgen.classifiers.heads import LinearHead
from mlgen.classifiers.losses import (
    AsymmetricLoss,
    asymmetric_loss,
    asymmetric_loss_probs,
    make_loss,
    mlcd_logit_loss,
    mlcd_loss,
)
from mlgen.classifiers.metrics import (
    average_precision,
    evaluate_scores,
    mean_average_precision,
    per_class_average_precision,
    precision_recall_f1_at_k,
)
from mlgen.classifiers.train_head import predict_scores, train_linear_head


def _random_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(6, 5, generator=g) < 0.4).double()
    return logits, targets


def _asl_numpy(logits: np.ndarray, y: np.ndarray, gamma_neg: float, gamma_pos: float, clip: float) -> np.ndarray:
    """Element-wise official ASL (Alibaba-MIIL/ASL), written independently in numpy."""
    p = 1 / (1 + np.exp(-logits))
    xs_neg = np.minimum(1 - p + clip, 1) if clip > 0 else 1 - p
    loss = y * np.log(np.maximum(p, 1e-8)) + (1 - y) * np.log(np.maximum(xs_neg, 1e-8))
    pt = p * y + xs_neg * (1 - y)
    gamma = gamma_pos * y + gamma_neg * (1 - y)
    return -loss * (1 - pt) ** gamma


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), [(4.0, 0.0, 0.05), (2.0, 1.0, 0.0)])
def test_asl_matches_numpy_reference(reduction: str, gamma_neg: float, gamma_pos: float, clip: float) -> None:
    logits, targets = _random_problem()
    got = asymmetric_loss(logits, targets, gamma_neg, gamma_pos, clip, reduction=reduction)
    ref = _asl_numpy(logits.numpy(), targets.numpy(), gamma_neg, gamma_pos, clip)
    expected = ref.sum() if reduction == "sum" else ref.mean()
    assert got.item() == pytest.approx(expected, rel=1e-10)
    module = AsymmetricLoss(gamma_neg, gamma_pos, clip, reduction=reduction)
    assert module(logits, targets).item() == pytest.approx(expected, rel=1e-10)


def test_asl_without_focusing_and_clip_is_bce() -> None:
    logits, targets = _random_problem(1)
    got = asymmetric_loss(logits, targets, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    assert got.item() == pytest.approx(bce.item(), rel=1e-8)


def test_asl_clip_only_changes_negatives() -> None:
    logits, targets = _random_problem(2)
    no_clip = asymmetric_loss(logits, targets, 4.0, 0.0, clip=0.0, reduction="sum")
    clipped = asymmetric_loss(logits, targets, 4.0, 0.0, clip=0.05, reduction="sum")
    pos = targets.bool()
    pos_no_clip = asymmetric_loss(logits[pos], targets[pos], 4.0, 0.0, clip=0.0)
    pos_clipped = asymmetric_loss(logits[pos], targets[pos], 4.0, 0.0, clip=0.05)
    assert pos_clipped.item() == pytest.approx(pos_no_clip.item(), rel=1e-12)
    neg_no_clip = asymmetric_loss(logits[~pos], targets[~pos], 4.0, 0.0, clip=0.0)
    neg_clipped = asymmetric_loss(logits[~pos], targets[~pos], 4.0, 0.0, clip=0.05)
    assert neg_clipped.item() < neg_no_clip.item()
    assert clipped.item() < no_clip.item()


def test_asl_detached_focal_weight_changes_gradient_only() -> None:
    logits, targets = _random_problem(3)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    loss_a = asymmetric_loss(a, targets, focal_weight_grad=True)
    loss_b = asymmetric_loss(b, targets, focal_weight_grad=False)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-12)
    loss_a.backward()
    loss_b.backward()
    assert not torch.allclose(a.grad, b.grad)


def test_asl_does_not_reenable_grad() -> None:
    logits, targets = _random_problem(4)
    with torch.no_grad():
        asymmetric_loss(logits, targets, focal_weight_grad=False)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_asl_probs_equals_logits_version_and_rejects_bad_reduction() -> None:
    logits, targets = _random_problem(5)
    for reduction in ("sum", "mean"):
        via_logits = asymmetric_loss(logits, targets, reduction=reduction)
        via_probs = asymmetric_loss_probs(torch.sigmoid(logits), targets, reduction=reduction)
        assert via_probs.item() == pytest.approx(via_logits.item(), rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        asymmetric_loss(logits, targets, reduction="none")


def _pull(loss, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, d loss / d logit) on a grid of probabilities p, every entry trained on the soft ``target``."""
    p = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)[None]
    logits = torch.logit(p).requires_grad_(True)
    loss(logits, torch.full_like(p, target)).backward()
    return p[0], logits.grad[0]


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.9])
def test_asl_and_bce_pull_a_soft_target_to_its_value(target: float) -> None:
    """--soft-targets: the gradient pushes p up below one point and down above it, below the clip margin too
    (where ASL's negative part is flat): ASL settles at y(1 + clip) (the official probability shift), BCE at y."""
    asl, dualcoop = make_loss("asl"), make_loss("asl", "dualcoop")  # gamma- 4, gamma+ 0; gamma- 2, gamma+ 1
    for loss, settles in ((asl, target * 1.05), (dualcoop, target * 1.05), (make_loss("bce"), target)):
        p, grad = _pull(loss, target)
        assert (grad[p < settles - 2e-3] < 0).all() and (grad[p > settles + 2e-3] > 0).all(), (loss, settles)


def test_mlcd_counts_only_targets_at_one_as_positives() -> None:
    """A soft target is a negative to MLCD (it has no soft form; --soft-targets refuses it): the loss with soft
    targets is the loss with those entries at 0."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.2, 1.5, -2.0, 0.7]])
    hard = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    soft = hard + torch.tensor([[0.0, 0.4, 0.0, 0.9], [0.3, 0.0, 0.2, 0.0]])
    assert mlcd_logit_loss(logits, soft, negative_fraction=1.0) == mlcd_logit_loss(logits, hard, negative_fraction=1.0)


def test_mlcd_loss_decreases_towards_positive_centres() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=g)
    positive = torch.zeros(4, 6, dtype=torch.bool)
    positive[torch.arange(4), torch.tensor([0, 1, 2, 3])] = True
    positive[0, 4] = True
    target = positive.float() @ F.normalize(centers, dim=1)
    start = torch.randn(4, 16, generator=g)
    losses = [
        mlcd_loss((1 - t) * start + t * target, centers, positive, negative_fraction=1.0).item()
        for t in (0.0, 0.5, 1.0)
    ]
    assert losses[0] > losses[1] > losses[2]


def test_mlcd_loss_hand_computation_with_all_negatives() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positive = torch.tensor([[True, False, False], [False, True, True]])
    scale = 2.0
    c = 1 / math.sqrt(2)
    # sample 0: pos cos 1; neg cos 0, c.  sample 1: pos cos 1, c; neg cos 0.
    l0 = math.log(1 + math.exp(-scale)) + math.log(1 + math.exp(0) + math.exp(scale * c))
    l1 = math.log(1 + math.exp(-scale) + math.exp(-scale * c)) + math.log(1 + math.exp(0))
    got = mlcd_loss(embeddings, centers, positive, margin=0.0, scale=scale, negative_fraction=1.0)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    # the margin makes positives harder, so the loss grows
    assert (
        mlcd_loss(
            embeddings,
            centers,
            positive,
            margin=0.3,
            scale=scale,
            negative_fraction=1.0,
        )
        > got
    )


def test_mlcd_negative_sampling_is_seeded_and_keeps_one() -> None:
    embeddings = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    centers = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    positive = torch.zeros(8, 50, dtype=torch.bool)
    positive[:, 0] = True

    def run(seed: int, fraction: float) -> float:
        return mlcd_loss(
            embeddings,
            centers,
            positive,
            negative_fraction=fraction,
            generator=torch.Generator().manual_seed(seed),
        ).item()

    assert run(0, 0.1) == run(0, 0.1)
    assert run(0, 0.1) != run(1, 0.1)
    # a tiny fraction still samples one negative per row, so the negative term is > log(1) = 0
    pos_only = mlcd_loss(embeddings, centers[:1], positive[:, :1]).item()
    assert run(0, 1e-9) > pos_only


def test_average_precision_hand_examples() -> None:
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(
        (1 / 1 + 2 / 3) / 2
    )
    assert average_precision(np.array([0.1, 0.4, 0.3]), np.array([1, 0, 0])) == pytest.approx(1 / 3)
    assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


def test_map_perfect_ranking_and_skips_classes_without_positives() -> None:
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert mean_average_precision(targets + 0.1, targets) == pytest.approx(1.0)
    scores = np.array([[0.9, 0.8, 0.1], [0.8, 0.9, 0.2], [0.7, 0.6, 0.3], [0.6, 0.7, 0.4]])
    per_class = per_class_average_precision(scores, targets)
    assert math.isnan(per_class[2])
    # class 0 ranks: 1(+), 2(-), 3(+) -> (1 + 2/3)/2; class 1 ranks: 1(+), 2(-), 3(-), 4(+) -> (1 + 2/4)/2
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + (1 + 2 / 4) / 2) / 2)


def test_precision_recall_f1_at_3_hand_example() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    targets = np.array([[1, 0, 1, 1, 0], [1, 0, 0, 0, 1]])
    # image 0 top-3 {0,1,2}: 2 TP; image 1 top-3 {4,3,2}: 1 TP; 5 positives in total
    got = precision_recall_f1_at_k(scores, targets, k=3)
    p, r = 3 / 6, 3 / 5
    assert got["precision"] == pytest.approx(p)
    assert got["recall"] == pytest.approx(r)
    assert got["f1"] == pytest.approx(2 * p * r / (p + r))
    summary = evaluate_scores(scores, targets, k=3)
    assert set(summary) == {"mAP", "precision@3", "recall@3", "f1@3", "images"}
    assert summary["images"] == 2 and summary["precision@3"] == pytest.approx(p)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        evaluate_scores(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="empty"):
        mean_average_precision(np.zeros((0, 4)), np.zeros((0, 4)))


def _separable_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=g)
    targets = (features[:, :3] > 0).float()
    return features, targets


def test_train_linear_head_learns_separable_problem() -> None:
    features, targets = _separable_problem()
    untrained = LinearHead(8, 3, generator=torch.Generator().manual_seed(0))
    base = mean_average_precision(predict_scores(untrained, features).numpy(), targets.numpy())
    head, history = train_linear_head(features, targets, None, epochs=30, progress=False)
    scores = predict_scores(head, features, batch_size=64)
    assert scores.shape == (200, 3) and not head.training
    trained = mean_average_precision(scores.numpy(), targets.numpy())
    assert trained > 0.9
    assert trained > base + 0.2
    assert history[-1] < history[0]


def test_train_linear_head_is_deterministic() -> None:
    features, targets = _separable_problem()
    init = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    head_a, loss_a = train_linear_head(features, targets, init, epochs=3, seed=7, progress=False)
    head_b, loss_b = train_linear_head(features, targets, init, epochs=3, seed=7, progress=False)
    head_c, _ = train_linear_head(features, targets, init, epochs=3, seed=8, progress=False)
    assert torch.equal(head_a.weight, head_b.weight) and torch.equal(head_a.bias, head_b.bias)
    assert loss_a == loss_b
    assert not torch.equal(head_a.weight, head_c.weight)
