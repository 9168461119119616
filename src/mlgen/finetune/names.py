"""Each label's text on the CLIP-score loss's side: its best name from an earlier filtered run (``--names-from``).

The filter measures how well the teacher reads each of a label's names (``filtered/reliability.json``: every
name's AUROC and the ``best_name``). Fine-tuning runs before a run generates, so it reads that file from an
earlier run (a first round without fine-tuning). The rule: a label's best name takes the place of the label's
own name, and the user's aliases are averaged in after it as before (``[best name, *aliases]``, each name once);
a label whose best name is itself keeps today's text. The parsed names, not the path, are the setting
``best_names`` (only the labels whose best name is another name), so another file that names the labels the
same way is the same setting, and one that names them otherwise is refused like any changed setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlgen.errors import MlgenError
from mlgen.labels import names_of, normalise_label


def loss_names(label: str, best: dict[str, str] | None, aliases: dict[str, list[str]] | None) -> list[str]:
    """The names whose mean is ``label``'s text feature: its best name (else itself), then its aliases, each once."""
    name = (best or {}).get(label, label)
    return names_of(name, {name: (aliases or {}).get(label, [])})  # the label's aliases, under its best name


def best_names_from_mapping(
    data: object, source: str, classes: list[str], aliases: dict[str, list[str]] | None = None
) -> dict[str, str]:
    """Each label's best name (every label a key; one not in ``data`` keeps its own name), normalised.

    An unknown label, a name that is not text, or a name that is another label, another label's best name or
    another label's alias is one :class:`MlgenError` (a name of two labels would score both the same)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MlgenError(f"{source}: expected a mapping of label to name, got {type(data).__name__}")
    best = {label: label for label in classes}
    for key, value in data.items():
        label = normalise_label(str(key))
        if label not in best:
            raise MlgenError(f"{source}: '{label}' is not one of the labels ({', '.join(classes)})")
        if not isinstance(value, str) or not normalise_label(value):
            raise MlgenError(f"{source}: the best name of '{label}' must be a non-empty name, got {value!r}")
        best[label] = normalise_label(value)
    for label in sorted(classes, key=lambda c: best[c] == c):  # a label read by another name first: it is named
        name = best[label]
        for other in classes:
            if other != label and name in (other, best[other], *(aliases or {}).get(other, [])):
                raise MlgenError(f"{source}: best name '{name}' of '{label}' is also a name of '{other}'")
    return best


def best_name_setting(best: dict[str, str] | None) -> dict[str, str] | None:
    """The best names as a stage setting: only the labels read by another name, in label order; None when none is
    (a run without ``--names-from``, or with a file whose best names are the labels, keeps its settings and hash)."""
    compact = {label: name for label, name in (best or {}).items() if name != label}
    return compact or None


def read_best_names(path: Path, classes: list[str], aliases: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Each label's ``best_name`` in ``path``, a filtered run's reliability.json (``finetune --names-from``).

    The file must name every label of ``classes`` and no other; any problem is one :class:`MlgenError`. Nothing
    in the file is used as a path."""
    from mlgen.report import load_reliability

    if not path.is_file():
        raise MlgenError(f"reliability file not found: {path} (--names-from takes an earlier run's reliability.json)")
    rows = load_reliability(path)["labels"]
    found: dict[str, str] = {}
    for row in rows:
        label, name = _text(row, "label", path), _text(row, "best_name", path)
        if label in found:
            raise MlgenError(f"{path}: label '{label}' appears twice")
        found[label] = name
    _check_labels(path, list(found), classes)
    return best_names_from_mapping(found, str(path), classes, aliases)


def _text(row: dict[str, Any], key: str, path: Path) -> str:
    value = row[key]
    if not isinstance(value, str) or not normalise_label(value):
        raise MlgenError(f"{path}: not a reliability file ({key} {value!r} of a label is not a name)")
    return normalise_label(value)


def _check_labels(path: Path, found: list[str], classes: list[str]) -> None:
    """The file was written for this run's labels: each of them in it, and no other."""
    others = [label for label in found if label not in classes]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise MlgenError(
            f"{path} was made for other labels: '{others[0]}'{more} is not a label of this run ({', '.join(classes)})"
        )
    missing = [label for label in classes if label not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MlgenError(f"{path} has no best name for '{missing[0]}'{more}, a label of this run")
