"""Label sets: which labels appear together in one image (Diff-ZS-MLC: every unordered pair)."""

from __future__ import annotations

from itertools import combinations_with_replacement

from mlgen.errors import MlgenError


def label_pairs(labels: list[str], exclude: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, ...]]:
    """Every unordered pair of labels, a label with itself included (17 labels -> 153 pairs).

    A self pair is ONE requested label (the official code deduplicates it the same way, so the
    label keeps its own softmax group in the filter and k = 1). Pairs in ``exclude`` (e.g. ones the generator and
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


def _check_labels(entries: tuple[tuple[str, ...], ...], labels: list[str], what: str) -> None:
    known = set(labels)
    for entry in entries:
        unknown = [label for label in entry if label not in known]
        if unknown:
            raise MlgenError(f"{what} names '{unknown[0]}', which is not in the classes file")


def balanced_sets(
    labels: list[str], max_size: int, sets_per_label: int, seed: int, exclude: tuple[tuple[str, str], ...] = ()
) -> list[tuple[str, ...]]:
    """Label sets of 1..``max_size`` labels in which every label appears about ``sets_per_label`` times.

    Each new set starts from the label seen least so far and adds the least-seen labels that may be
    combined with it (never an excluded pair); its size is drawn uniformly from 1..``max_size``.
    Deterministic for a seed; no set repeats.
    """
    import random

    if max_size > len(labels):
        raise MlgenError(f"--set-size {max_size} is larger than the number of labels ({len(labels)})")
    _check_labels(exclude, labels, "exclude_pairs")
    excluded = {frozenset(pair) for pair in exclude}
    rng = random.Random(seed)
    counts = dict.fromkeys(labels, 0)
    sets: list[tuple[str, ...]] = []
    seen: set[frozenset[str]] = set()
    tries = 0
    while min(counts.values()) < sets_per_label and tries < 100 * len(labels) * sets_per_label:
        tries += 1
        order = sorted(labels, key=lambda label: (counts[label], rng.random()))
        chosen = [order[0]]
        size = rng.randint(1, max_size)
        for label in order[1:]:
            if len(chosen) == size:
                break
            if all(frozenset((label, other)) not in excluded for other in chosen):
                chosen.append(label)
        key = frozenset(chosen)
        if key in seen:
            continue
        seen.add(key)
        sets.append(tuple(label for label in labels if label in key))  # class-file order
        for label in chosen:
            counts[label] += 1
    return sets


def read_label_lines(path: str, what: str) -> tuple[tuple[str, ...], ...]:
    """A file of comma-separated labels, one entry a line; blank lines and # comments skipped."""
    from pathlib import Path

    from mlgen.labels import read_text_file  # a BOM dropped, bad bytes one line

    file = Path(path)
    if not file.is_file():
        raise MlgenError(f"{what} file not found: {path}")
    entries = []
    for number, line in enumerate(read_text_file(file, f"{what} file").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        entry = tuple(label.strip() for label in line.split(","))
        if any(not label for label in entry):
            raise MlgenError(f"{path}:{number}: an empty label (labels are separated by commas)")
        entries.append(entry)
    if not entries:
        raise MlgenError(f"{what} file {path} names no labels")
    return tuple(entries)


def read_exclude_pairs(path: str) -> tuple[tuple[str, str], ...]:
    pairs = read_label_lines(path, "--exclude-pairs")
    for pair in pairs:
        if len(pair) != 2:
            raise MlgenError(f"{path}: every line names two labels, 'a, b'; got {', '.join(pair)!r}")
    return tuple((a, b) for a, b in pairs)


def explicit_sets(labels: list[str], sets: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """The sets of ``--label-sets`` in class-file order, repeats within a set collapsed, repeated sets dropped."""
    _check_labels(sets, labels, "--label-sets")
    result: list[tuple[str, ...]] = []
    for entry in sets:
        normal = tuple(label for label in labels if label in entry)
        if normal not in result:
            result.append(normal)
    return result


def compose_sets(
    labels: list[str],
    exclude: tuple[tuple[str, str], ...],
    set_size: int | None,
    sets_per_label: int,
    label_sets: tuple[tuple[str, ...], ...] | None,
    seed: int,
) -> tuple[list[tuple[str, ...]], str]:
    """The label sets and how they were made: ``file``, ``balanced`` or ``pairs`` (the paper's)."""
    if label_sets:
        return explicit_sets(labels, label_sets), "file"
    if set_size is not None:
        return balanced_sets(labels, set_size, sets_per_label, seed, exclude), "balanced"
    return label_pairs(labels, exclude), "pairs"
