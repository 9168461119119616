"""Reading and normalising the label list (``--classes FILE``)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from mlgen.errors import MlgenError


def normalise_label(text: str) -> str:
    """One canonical spelling: Unicode NFKC, single spaces, lower case (CLIP is uncased)."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def parse_labels(text: str, source: str) -> list[str]:
    """Labels from text, one per line; blank lines and ``#`` comments are ignored."""
    labels: list[str] = []
    first_line: dict[str, int] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        label = normalise_label(stripped)
        if label in first_line:
            raise MlgenError(f"{source}:{line_number}: duplicate label '{label}' (same as line {first_line[label]})")
        first_line[label] = line_number
        labels.append(label)
    if not labels:
        raise MlgenError(f"{source} has no labels (blank lines and # comments are ignored)")
    if len(labels) < 2:
        raise MlgenError(f"{source} has one label; a multi-label classifier needs at least two")
    return labels


def read_labels(path: Path) -> list[str]:
    """Labels from a UTF-8 text file; any problem is one clear :class:`MlgenError`."""
    if not path.is_file():
        raise MlgenError(f"classes file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MlgenError(f"{path} is not UTF-8 text (byte {err.start})") from None
    return parse_labels(text, str(path))
