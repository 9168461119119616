"""The label set of one generated image, drawn as the official Diff-ZS-MLC generation loop draws it.

The official COCO script (``generate_image_coco/inference.py``) picks two labels at random, drops a repeat and,
when only one label is left, picks once more and drops a repeat again: a single-label image has probability
about 1/n² (n labels), a given pair about 2/n². A draw that is no label set of the run (an excluded pair) is
redrawn whole, as the official loop redraws its confusable pairs.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mlgen.errors import MlgenError

# The rule's name in the generate stage's settings: a run planned under another rule has another config hash,
# so it is refused on resume rather than continued with differently drawn images.
LABEL_DRAW = "two picks, deduplicated, one redraw"
MAX_MISSES = 1000  # draws that are no label set before giving up (every draw excluded)


def draw_label_set(rng: np.random.Generator, labels: list[str]) -> tuple[str, ...]:
    """Two labels with replacement, a repeat dropped, then one more pick when a single label is left (a
    repeat again dropped): single-label with probability 1/n². Deterministic from ``rng``; in ``labels`` order."""
    picks = {int(i) for i in rng.integers(len(labels), size=2)}
    if len(picks) < 2:
        picks.add(int(rng.integers(len(labels))))
    return tuple(labels[i] for i in sorted(picks))


def image_rng(run_seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``'s draws: from the run seed and the image's number alone (never its batch,
    shard or rank), so a resumed or multi-rank run draws the same label sets."""
    digest = hashlib.sha256(f"{run_seed}/label-set/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def draw_known_set(rng: np.random.Generator, labels: list[str], known: dict[frozenset, int]) -> int:
    """The id of a drawn label set among ``known`` (label set -> id), redrawing draws that are not one."""
    for _ in range(MAX_MISSES):
        set_id = known.get(frozenset(draw_label_set(rng, labels)))
        if set_id is not None:
            return set_id
    raise MlgenError(f"{MAX_MISSES} label-set draws in a row matched no label set of the prompt stage")


def draw_shares(labels: list[str], sets: list[tuple[str, ...]]) -> list[float]:
    """The expected share of images of each label set under the draw: {a} 1/n³, {a, b} 2(n+1)/n³, renormalised
    over ``sets`` (a draw that is none of them is redrawn). For the dry run: simulating the draw per image
    costs about 30 µs an image."""
    n = len(labels)
    raw = [1 / n**3 if len(s) == 1 else 2 * (n + 1) / n**3 if len(s) == 2 else 0.0 for s in sets]
    total = sum(raw)
    return [p / total for p in raw] if total else raw
