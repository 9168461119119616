"""Reading and normalising the label list (``--classes FILE``)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import yaml

from mlgen.errors import MlgenError


def normalise_label(text: str) -> str:
    """One canonical spelling: Unicode NFKC, single spaces, lower case (CLIP is uncased)."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).lower()


def parse_labels(text: str, source: str, minimum: int = 2) -> list[str]:
    """Labels from text, one per line; blank lines and ``#`` comments are ignored; at least ``minimum``."""
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
    if len(labels) < minimum:
        raise MlgenError(f"{source} has one label; a multi-label classifier needs at least two")
    return labels


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; a missing file or bad bytes is one :class:`MlgenError` naming ``what``."""
    if not path.is_file():
        raise MlgenError(f"{what} not found: {path}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MlgenError(f"{path} is not UTF-8 text (byte {err.start})") from None


def read_labels(path: Path, what: str = "classes file", minimum: int = 2) -> list[str]:
    """Labels from a UTF-8 text file; any problem is one clear :class:`MlgenError`."""
    return parse_labels(read_text_file(path, what), str(path), minimum)


def parse_aliases(text: str, source: str, classes: list[str]) -> dict[str, list[str]]:
    """Each label's user aliases from ``label: alias, alias`` lines or a YAML mapping of lists.

    Every label of ``classes`` is a key of the result (an empty list when it has no alias). An
    unknown label, an alias that is another label, or a malformed line is one :class:`MlgenError`.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise MlgenError(f"{source}{where}: not 'label: alias, alias' lines or a YAML mapping") from None
    return aliases_from_mapping(data, source, classes)


def aliases_from_mapping(data: object, source: str, classes: list[str]) -> dict[str, list[str]]:
    """:func:`parse_aliases` of an already loaded mapping (a ``label_aliases`` setting of a config file)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MlgenError(f"{source}: expected 'label: alias, alias' lines or a YAML mapping, got {type(data).__name__}")
    aliases: dict[str, list[str]] = {label: [] for label in classes}
    for key, value in data.items():
        label = normalise_label(str(key))
        if label not in aliases:
            raise MlgenError(f"{source}: '{label}' is not one of the labels ({', '.join(classes)})")
        if isinstance(value, str):
            items = value.split(",")
        elif isinstance(value, list) and all(isinstance(item, (str, int, float)) for item in value):
            items = [str(item) for item in value]
        else:
            raise MlgenError(f"{source}: the aliases of '{label}' must be a comma-separated line or a list of names")
        for alias in (normalise_label(item) for item in items):
            if not alias:
                raise MlgenError(f"{source}: '{label}' has an empty alias")
            if alias in aliases and alias != label:
                raise MlgenError(f"{source}: alias '{alias}' of '{label}' is another label")
            other = next((o for o, names in aliases.items() if o != label and alias in names), None)
            if other is not None:  # a name of two labels names neither: prompts and scores could not tell them apart
                raise MlgenError(f"{source}: alias '{alias}' is given for both '{other}' and '{label}'")
            if alias != label and alias not in aliases[label]:
                aliases[label].append(alias)
    return aliases


def read_aliases(path: Path, classes: list[str]) -> dict[str, list[str]]:
    """User aliases (``--label-aliases FILE``) of ``classes``; any problem is one :class:`MlgenError`."""
    return parse_aliases(read_text_file(path, "aliases file"), str(path), classes)


def names_of(label: str, *extra: dict[str, list[str]] | None) -> list[str]:
    """A label's name followed by its other names (synonyms, aliases), each once, in order."""
    names = [label]
    for mapping in extra:
        for name in (mapping or {}).get(label, []):
            if name not in names:
                names.append(name)
    return names


def alias_setting(aliases: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    """The aliases as a stage setting: only the labels that have some, in label order; None when none has
    (so a run without aliases keeps the settings, and the hash, it had before aliases existed)."""
    compact = {label: list(names) for label, names in (aliases or {}).items() if names}
    return compact or None
