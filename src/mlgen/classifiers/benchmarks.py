"""The zero-shot multi-label benchmarks in the layouts the public code reads (DualCoOp, Diff-ZS-MLC).

A data spec ``coco-zsl:ROOT[:SPLIT]`` or ``nus-zsl:ROOT[:SPLIT]`` names one of them wherever mlgen takes
labelled images (``--data``, ``--seen-data``, ``--oracle-data``):

- ``coco-zsl``: MS-COCO 2014 with the 48/17 split of Bansal et al.: ``ROOT/annotations/
  instances_{train2014_seen,val2014_unseen,val2014_gzsi}_48_17.json`` (COCO instance files), images in
  ``ROOT/train2014/`` and ``ROOT/val2014/``. As the official loader, an image is one with an annotation.
- ``nus-zsl``: NUS-WIDE 925/81: ``ROOT/annotations/Tag_all/all_labels.txt`` (1,006 names),
  ``ROOT/annotations/zsl/formatted_*_filtered.npy`` (multi-hot rows over those names, and image paths
  relative to ``ROOT/images/``). The 81 unseen names ship with mlgen; seen = the other names.

Splits: ``seen-train`` (seen labels only), ``unseen-test`` (unseen labels only: the ZSL test) and ``gzsl-test``
(every label: the GZSL test). The class lists of each file are checked against the split shipped with mlgen.
Everything a split needs is checked when it is opened (one line naming the file), before any image is read.
"""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mlgen.errors import MlgenError
from mlgen.labels import normalise_label

BENCHMARKS = ("coco-zsl", "nus-zsl")
SPLITS = ("seen-train", "unseen-test", "gzsl-test")
NUS_LABELS = 1006
COCO_FILES = {
    "seen-train": ("instances_train2014_seen_48_17.json", "train2014"),
    "unseen-test": ("instances_val2014_unseen_48_17.json", "val2014"),
    "gzsl-test": ("instances_val2014_gzsi_48_17.json", "val2014"),
}
NUS_FILES = {  # (labels, image list) in ROOT/annotations/zsl/, as DualCoOp's train / val / test_gzsl
    "seen-train": ("formatted_train_all_labels_filtered.npy", "formatted_train_images_filtered.npy"),
    "unseen-test": ("formatted_val_all_labels_filtered.npy", "formatted_val_images_filtered.npy"),
    "gzsl-test": ("formatted_val_gzsl_labels_filtered.npy", "formatted_val_gzsl_images_filtered.npy"),
}
# NUS-WIDE's fourth split: the official code picks its GZSL checkpoint on this subset of the GZSL test
# (``--select official``); scored on every label, as gzsl-test.
NUS_SELECTION_FILES = {
    "val-gzsl-small": ("formatted_val_gzsl_labels_filtered_small.npy", "formatted_val_gzsl_images_filtered_small.npy")
}
# The papers' tables: P/R/F1 at these top-k (NUS-WIDE also reports top-5).
TOP_K = {"coco-zsl": (3,), "nus-zsl": (3, 5)}


@dataclass(frozen=True)
class Spec:
    benchmark: str  # coco-zsl or nus-zsl
    root: Path
    split: str | None  # None: the whole benchmark (``mlgen evaluate`` scores ZSL and GZSL)

    def __str__(self) -> str:
        return f"{self.benchmark}:{self.root}" + (f":{self.split}" if self.split else "")


@dataclass(frozen=True)
class Split:
    """One split, checked: image files (all there) with their labels, and the labels the split scores."""

    spec: Spec
    annotation: Path  # the file the labels come from
    classes: list[str]  # the split's labels (48, 17 or 65; 925, 81 or 1006)
    unseen: list[str]  # the benchmark's unseen labels
    files: list[Path]
    labels: list[tuple[str, ...]]


def parse_spec(data: str | Path | None) -> Spec | None:
    """The benchmark a ``--data`` value names, or None for a plain file or folder."""
    text = str(data) if data is not None else ""
    name, sep, rest = text.partition(":")
    if not sep or name not in BENCHMARKS:
        return None
    root, split = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and "/" not in tail:
        if tail not in SPLITS and not (name == "nus-zsl" and tail in NUS_SELECTION_FILES):
            raise MlgenError(f"{text}: unknown split '{tail}' (use {', '.join(SPLITS)})")
        root, split = head, tail
    if not root:
        raise MlgenError(f"{text}: name the benchmark's folder, e.g. {name}:/data/{name.split('-')[0]}")
    return Spec(name, Path(root).expanduser(), split)


def data_exists(data: str | Path) -> bool:
    """Whether a labelled-data value names something there (a benchmark: its root folder)."""
    spec = parse_spec(data)
    return spec.root.is_dir() if spec else Path(data).exists()


def shipped(name: str) -> list[str]:
    """A class list shipped with mlgen (``mlgen/classifiers/splits/NAME.txt``)."""
    text = resources.files("mlgen.classifiers").joinpath("splits", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def split_labels(benchmark: str, names: list[str] | None = None) -> dict[str, list[str]]:
    """Each split's labels: seen, unseen and all (NUS-WIDE's seen ones are ``names`` less the shipped 81)."""
    if benchmark == "coco-zsl":
        seen, unseen = shipped("coco_48_17_seen"), shipped("coco_48_17_unseen")
    else:
        unseen = shipped("nus_81_unseen")
        seen = [n for n in names or [] if n not in set(unseen)]
    return {"seen-train": seen, "unseen-test": unseen, "gzsl-test": seen + unseen}


def split_classes(data: str | Path) -> list[str]:
    """The labels a benchmark split scores (all 48 seen ones of ``coco-zsl:ROOT:seen-train``, even those no
    image shows); none for other data. A classifier trained on the split knows them all, as the official one."""
    spec = parse_spec(data)
    return open_split(spec).classes if spec else []


def open_split(spec: Spec, split: str | None = None) -> Split:
    """The split ``split`` (default: the spec's own) of a benchmark, every file checked."""
    split = split or spec.split
    if split is None:
        raise MlgenError(f"{spec}: name a split here ({spec}:{SPLITS[0]}, :{SPLITS[1]} or :{SPLITS[2]})")
    root = spec.root.resolve()
    return _open_cached(spec.benchmark, root, split, _stamp(spec.benchmark, root, split))


def _stamp(benchmark: str, root: Path, split: str) -> tuple:
    """(size, mtime) of a split's annotation files: a changed file is read again."""
    if benchmark == "coco-zsl":
        files = [root / "annotations" / COCO_FILES[split][0]]
    else:
        files = [root / "annotations" / "Tag_all" / "all_labels.txt"]
        files += [root / "annotations" / "zsl" / name for name in {**NUS_FILES, **NUS_SELECTION_FILES}[split]]
    stats = [path.stat() if path.is_file() else None for path in files]
    return tuple((s.st_size, s.st_mtime_ns) if s else None for s in stats)


@functools.lru_cache(maxsize=4)  # a command reads a split more than once (its labels, then its images)
def _open_cached(benchmark: str, root: Path, split: str, stamp: tuple) -> Split:
    spec = Spec(benchmark, root, split)
    if not spec.root.is_dir():
        raise MlgenError(f"{spec.benchmark} folder not found: {spec.root}")
    opened = _open_coco(spec, split) if spec.benchmark == "coco-zsl" else _open_nus(spec, split)
    missing = next((path for path in opened.files if not path.is_file()), None)
    if missing is not None:
        raise MlgenError(f"{opened.annotation}: image {missing} is not there")
    return opened


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MlgenError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlgenError(f"{path}: not a COCO instance file ({type(err).__name__})") from None


def _check_classes(path: Path, found: list[str], expected: list[str], what: str) -> None:
    if sorted(found) != sorted(expected) or len(set(found)) != len(found):
        extra = sorted(set(found) - set(expected))[:3]
        missing = sorted(set(expected) - set(found))[:3]
        raise MlgenError(
            f"{path}: its {len(found)} classes are not the {len(expected)} {what} of the shipped split "
            f"(not in the split: {', '.join(extra) or '-'}; missing: {', '.join(missing) or '-'})"
        )


def _open_coco(spec: Spec, split: str) -> Split:
    name, folder = COCO_FILES[split]
    path = spec.root / "annotations" / name
    data = _read_json(path)
    labels = split_labels("coco-zsl")
    try:
        names = {c["id"]: normalise_label(c["name"]) for c in data["categories"]}
        images = {image["id"]: str(image["file_name"]) for image in data["images"]}
        per_image: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            per_image.setdefault(annotation["image_id"], []).append(names[annotation["category_id"]])
        files = [images[image_id] for image_id in per_image]
    except (KeyError, TypeError) as err:
        raise MlgenError(f"{path}: not a COCO instance file (missing {err})") from None
    what = {"seen-train": "seen classes", "unseen-test": "unseen classes", "gzsl-test": "classes"}[split]
    _check_classes(path, list(names.values()), labels[split], what)
    root = spec.root / folder
    return Split(
        Spec(spec.benchmark, spec.root, split),
        path,
        labels[split],
        labels["unseen-test"],
        [_inside(root, f, path) for f in files],
        [tuple(dict.fromkeys(found)) for found in per_image.values()],
    )


def _open_nus(spec: Spec, split: str) -> Split:
    names_file = spec.root / "annotations" / "Tag_all" / "all_labels.txt"
    if not names_file.is_file():
        raise MlgenError(f"label list not found: {names_file}")
    names = [normalise_label(line) for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != NUS_LABELS or len(set(names)) != len(names):
        raise MlgenError(f"{names_file}: {len(names)} names ({len(set(names))} distinct), not NUS-WIDE's {NUS_LABELS}")
    labels = split_labels("nus-zsl", names)
    absent = [label for label in labels["unseen-test"] if label not in set(names)]
    if absent:
        raise MlgenError(f"{names_file}: the unseen label '{absent[0]}' of the shipped 925/81 split is not in it")
    labels_name, images_name = {**NUS_FILES, **NUS_SELECTION_FILES}[split]
    if split in NUS_SELECTION_FILES:
        labels[split] = labels["gzsl-test"]
    folder = spec.root / "annotations" / "zsl"
    targets, paths = _load_npy(folder / labels_name), _load_npy(folder / images_name)
    if targets.ndim != 2 or targets.shape[1] != NUS_LABELS or targets.dtype.kind not in "biuf":
        raise MlgenError(
            f"{folder / labels_name}: shape {targets.shape} {targets.dtype}, not [N, {NUS_LABELS}] numbers"
        )
    if paths.ndim != 1 or paths.dtype.kind not in "USO" or len(paths) != len(targets):
        raise MlgenError(
            f"{folder / images_name}: {paths.shape} {paths.dtype} does not match {folder / labels_name}'s "
            f"{len(targets)} rows (one image path per row)"
        )
    keep = np.array([n in set(labels[split]) for n in names])
    rows = [tuple(names[c] for c in np.flatnonzero((row > 0) & keep)) for row in targets]
    root = spec.root / "images"
    return Split(
        Spec(spec.benchmark, spec.root, split),
        folder / labels_name,
        labels[split],
        labels["unseen-test"],
        [_inside(root, _text(p, folder / images_name).strip(), folder / images_name) for p in paths],
        rows,
    )


def _text(value, source: Path) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise MlgenError(f"{source}: holds a {type(value).__name__} where an image path belongs")
    return str(value)


def _inside(root: Path, relative: str, source: Path) -> Path:
    """``root / relative``, refusing paths that leave ``root`` (absolute paths, ``..``)."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise MlgenError(f"{source}: image path {relative!r} points outside {root}")
    return candidate


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy's own array reconstruction and nothing else: no other global is ever resolved."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file without unpickling code: numbers and fixed-width strings as they are; an object array
    (image names saved as Python strings) only through :class:`_ArraysOnly`, and only if it holds strings."""
    if not path.is_file():
        raise MlgenError(f"annotation file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise MlgenError(f"{path}: not a .npy array ({err})") from None
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f".npy format {version[0]}.{version[1]}")
            _, _, dtype = read_header[version](handle)
            array = _ArraysOnly(handle).load() if dtype.hasobject else None
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as err:
        raise MlgenError(f"{path}: an object array mlgen will not unpickle ({err})") from None
    if not isinstance(array, np.ndarray) or not all(isinstance(v, (str, bytes)) for v in array.ravel()):
        raise MlgenError(f"{path}: an object array that is not a list of image paths")
    return array


def split_images(split: Split) -> Iterator[tuple[str, bytes | None, tuple[str, ...]]]:
    """(key, bytes, labels) of every image of a split, read one at a time."""
    base = split.spec.root
    for path, labels in zip(split.files, split.labels, strict=True):
        try:
            image = path.read_bytes()
        except OSError:
            image = None
        yield str(path.relative_to(base.resolve())), image, labels


class LazyImages(Sequence[bytes]):
    """Image files read when indexed (a test split of 40,000 images never sits in memory)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [path.read_bytes() for path in self.files[index]]
        return self.files[index].read_bytes()
