"""S^3 (arXiv 2412.04925): a synonym space per class instead of one label embedding.

Each class's synonyms are embedded by CLIP's text encoder. A Vietoris-Rips complex at one radius
(0-dimensional: the connected components of the graph "cosine distance <= radius") keeps the
largest component, dropping synonyms that drift away from the rest. An image's score for the class
is the cosine similarity between its embedding and the mean of its k nearest synonyms of that class
(the point-to-local-center metric).

DEFAULT_RADIUS = 0.35 (cosine distance): CLIP text embeddings of true synonyms ("dog", "puppy",
"hound") sit within ~0.1-0.3 of each other, while an unrelated word is usually 0.4 or more away,
so 0.35 joins the synonyms and leaves a drifted word as its own component.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_RADIUS = 0.35


def largest_component(features: Tensor, radius: float = DEFAULT_RADIUS) -> Tensor:
    """bool [M]: the members of the largest connected component at cosine distance <= ``radius``.

    Ties go to the component holding the lowest index (the label itself, when it comes first).
    """
    m = features.shape[0]
    if m == 0:
        return torch.zeros(0, dtype=torch.bool, device=features.device)
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    adjacent = (1.0 - unit @ unit.T) <= radius
    # label propagation: every node takes the smallest index it can reach; at most M rounds
    component = torch.arange(m, device=features.device)
    for _ in range(m):
        reach = torch.where(adjacent, component[None, :], m).min(dim=1).values
        updated = torch.minimum(component, reach)
        if torch.equal(updated, component):
            break
        component = updated
    sizes = torch.bincount(component, minlength=m)
    best = int(torch.argmax(sizes))  # argmax takes the first maximum, i.e. the lowest root
    return component == best


def s3_scores(
    image_features: Tensor, synonym_features: list[Tensor], k: int = 3, radius: float = DEFAULT_RADIUS
) -> Tensor:
    """[N, C] point-to-local-center cosine similarities of N images to C synonym spaces.

    ``synonym_features[c]`` is [M_c, D] (M_c >= 1): class c's label and synonyms embedded by CLIP.
    """
    images = torch.nn.functional.normalize(image_features.float(), dim=-1)
    columns = []
    for feats in synonym_features:
        if feats.shape[0] == 0:
            raise ValueError("every class needs at least one text embedding")
        kept = feats[largest_component(feats, radius)]
        unit = torch.nn.functional.normalize(kept.float().to(images.device), dim=-1)
        sims = images @ unit.T  # [N, M]
        nearest = sims.topk(min(k, unit.shape[0]), dim=1).indices  # [N, k]
        center = torch.nn.functional.normalize(unit[nearest].mean(dim=1), dim=-1)  # [N, D]
        columns.append((images * center).sum(-1))
    return torch.stack(columns, dim=1)
