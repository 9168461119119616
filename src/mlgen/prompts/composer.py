"""Label sets: which labels appear together in one image (Diff-ZS-MLC: every unordered pair)."""

from __future__ import annotations

from itertools import combinations_with_replacement

from mlgen.errors import MlgenError


def label_pairs(labels: list[str], exclude: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, ...]]:
    """Every unordered pair of labels, a label with itself included (17 labels -> 153 pairs).

    A self pair is ONE requested label (the paper's code passes it twice, which drops the label
    from its own softmax group in the filter). Pairs in ``exclude`` (e.g. ones the generator and
    CLIP confuse, like skateboard/snowboard) are left out.
    """
    excluded = set()
    for pair in exclude:
        if len(pair) != 2 or any(label not in labels for label in pair):
            raise MlgenError(f"exclude_pairs entry {list(pair)} must name two labels of the classes file")
        excluded.add(frozenset(pair))
    sets = []
    for a, b in combinations_with_replacement(labels, 2):
        if frozenset((a, b)) not in excluded:
            sets.append((a,) if a == b else (a, b))
    return sets


def template_prompt(label_set: tuple[str, ...]) -> str:
    """The paper's fallback sentence when there is no (usable) LLM output."""
    a, b = (label_set * 2)[:2]
    return f"A photo of a {a} next to a {b}."
