"""S^3: Vietoris-Rips largest component and the point-to-local-center score."""

from __future__ import annotations

import torch

from mlgen.filters.s3 import DEFAULT_RADIUS, largest_component, s3_scores


def test_largest_component_drops_a_drifted_synonym() -> None:
    features = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.3, 0.0], [0.9, 0.0, 0.4], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert largest_component(features, DEFAULT_RADIUS).tolist() == [True, True, True, False, False]
    # a chain joins through its middle member even when its ends are far apart
    chain = torch.tensor([[1.0, 0.0], [0.71, 0.71], [0.0, 1.0]])
    assert largest_component(chain, 0.3).tolist() == [True, True, True]
    assert largest_component(chain, 0.1).tolist() == [True, False, False]


def test_point_to_local_center_prefers_the_class_with_near_synonyms() -> None:
    cat = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.95, 0.0, 0.1]])
    dog = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.9, 0.0]])
    images = torch.tensor([[1.0, 0.05, 0.0], [0.05, 1.0, 0.0]])
    scores = s3_scores(images, [cat, dog], k=2)
    assert scores.shape == (2, 2)
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
    # k=1 is the nearest synonym itself: the image equals a synonym -> similarity 1
    assert torch.isclose(s3_scores(cat[1:2], [cat], k=1)[0, 0], torch.tensor(1.0))
