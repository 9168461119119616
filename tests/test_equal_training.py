"""Like for like: every arm gets the same optimizer steps per pass kind whatever its image count, one-source arms
follow the same learning-rate curve, and checkpoints are chosen on validation scores."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mlgen.classifiers.model import build_classifier
from mlgen.classifiers.train import Pass, fit, fixed_length, idle_pass
from mlgen.models.registry import open_clip_name

CLASSES = ["circle", "star", "square", "cross"]
UNSEEN = torch.tensor([True, True, False, False])


def _model():
    name = open_clip_name("tiny")[0]
    return build_classifier(open_clip.create_model(name), open_clip.get_tokenizer(name), CLASSES, "linear")


def _pass(model, images: int, name: str, columns) -> Pass:
    """A pass over ``images`` feature rows in batches of 2, each batch tagged with its epoch and rows."""
    features = model.frozen_features(torch.randn(images, 3, 64, 64, generator=torch.Generator().manual_seed(images)))
    targets = (torch.rand(images, 4, generator=torch.Generator().manual_seed(1)) > 0.5).float()

    def batches(epoch: int):
        order = torch.randperm(images, generator=torch.Generator().manual_seed(epoch))
        return [
            ({k: v[order[i : i + 2]] for k, v in features.items()}, targets[order[i : i + 2]])
            for i in range(0, images, 2)
        ]

    return Pass(batches, columns, name)


def test_fixed_length_passes_give_equal_steps_whatever_the_image_count() -> None:
    """An arm with 6 synthetic images and one with 20 get the same 3 steps a pass on each pass kind."""
    for images in (6, 20):
        model = _model()
        passes = [
            fixed_length(_pass(model, 8, "real", ~UNSEEN), 3),
            fixed_length(_pass(model, images, "synthetic", UNSEEN), 3),
        ]
        result = fit(model, passes, epochs=5, optimizer="sgd")
        assert result.steps_by_pass == {"real": 15, "synthetic": 15}


def test_a_fixed_length_pass_cycles_its_source_without_skipping_or_repeating_within_a_cycle() -> None:
    """3 batches a pass over a 4-batch source: the chained source epochs are read in order, each batch once."""
    seen: list[tuple[int, int]] = []
    source = Pass(lambda epoch: [(epoch, i) for i in range(4)])
    one = fixed_length(source, 3)
    for epoch in range(4):
        seen += list(one.batches(epoch))
    assert seen == [(e, i) for e in range(3) for i in range(4)]
    assert list(one.batches(1)) == [(0, 3), (1, 0), (1, 1)]  # a replay (a count, a restart) reads the same


def test_an_idle_pass_steps_the_schedule_like_a_second_source() -> None:
    """seen-only (one real pass) padded with an idle pass follows the two-pass arms' learning-rate curve."""
    model = _model()
    two = fit(model, [fixed_length(_pass(model, 8, "real", None), 2), fixed_length(_pass(model, 8, "s", None), 2)], 4)
    model = _model()
    one = fit(model, [fixed_length(_pass(model, 8, "real", None), 2), idle_pass()], 4)
    # two.lr_trace holds each pass's rate twice (2 batches); one's real passes are passes 0, 2, 4, 6 of that curve
    every_other_pass = [two.lr_trace[i] for i in range(0, len(two.lr_trace), 4) for _ in (0, 1)]
    assert one.lr_trace == pytest.approx(every_other_pass)
    assert one.steps_by_pass == {"real": 8}


def test_selection_keeps_the_best_validated_epoch() -> None:
    """The score rises then falls: the model ends with the weights of the epoch that scored best."""
    model = _model()
    snapshots: list[torch.Tensor] = []
    scores = iter([0.1, 0.5, 0.9, 0.2, 0.3])

    def select(trained) -> float:
        snapshots.append(trained.head.weight.detach().clone())
        return next(scores)

    result = fit(model, [_pass(model, 8, "all", None)], epochs=5, optimizer="adamw", select=select)
    assert result.selected_epoch == 2 and [e for e, _ in result.validation] == [0, 1, 2, 3, 4]
    assert torch.equal(model.head.weight, snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[4])  # training went on past the kept epoch
