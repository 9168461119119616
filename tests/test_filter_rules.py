"""The batched grouping softmax and exact-set rule against a direct, one-group-at-a-time reading of the paper."""

from __future__ import annotations

import pytest
import torch

from mlgen.filters import exact_set_keep, grouping_softmax, requested_mask


def reference_grouping_softmax(logits: torch.Tensor, requested: list[int]) -> torch.Tensor:
    """methods.md A, literally: one softmax per requested label over it and the non-requested classes."""
    classes = logits.shape[0]
    rest = [c for c in range(classes) if c not in requested]
    probs = torch.zeros(classes, dtype=torch.float64)
    for r in requested:
        group = torch.softmax(logits[[r, *rest]].double(), 0)
        probs[r] = group[0]
        probs[rest] += group[1:] / len(requested)
    return probs


def reference_keep(probs: torch.Tensor, requested: list[int], threshold: float) -> bool:
    top = torch.topk(probs, len(requested))
    return {int(i) for p, i in zip(top.values, top.indices, strict=True) if p > threshold} == set(requested)


@pytest.mark.parametrize("classes", [2, 5, 17])
def test_batched_functions_equal_the_per_group_definition(classes: int) -> None:
    generator = torch.Generator().manual_seed(classes)
    logits = 10 * torch.randn(64, classes, generator=generator)
    label_lists = [torch.randperm(classes, generator=generator)[: 1 + i % min(3, classes)].tolist() for i in range(64)]
    label_lists[0] = list(range(classes))  # every class requested: no non-requested class at all
    requested = requested_mask(label_lists, classes)
    probs = grouping_softmax(logits, requested)
    for row, labels in enumerate(label_lists):
        torch.testing.assert_close(
            probs[row].double(), reference_grouping_softmax(logits[row], labels), atol=1e-6, rtol=1e-5
        )
    for threshold in (0.3, 0.5, 0.9):
        expected = [reference_keep(probs[row], labels, threshold) for row, labels in enumerate(label_lists)]
        assert exact_set_keep(probs, requested, threshold).tolist() == expected


def test_a_row_with_nothing_requested_is_a_plain_softmax() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    probs = grouping_softmax(logits, torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_gradients_are_finite_even_for_extreme_logits() -> None:
    logits = torch.tensor([[300.0, -300.0, 0.0, 5.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    requested = requested_mask([[0, 1, 2, 3], [1]], 4)
    probs = grouping_softmax(logits, requested)
    (probs * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_exact_set_rule_cases() -> None:
    probs = torch.tensor([[0.9, 0.1, 0.7, 0.2], [0.9, 0.1, 0.7, 0.2], [0.9, 0.1, 0.7, 0.2]])
    requested = requested_mask([[0, 2], [0, 3], [0]], 4)
    assert exact_set_keep(probs, requested).tolist() == [True, False, True]
    assert exact_set_keep(probs, requested, threshold=0.8).tolist() == [False, False, True]
