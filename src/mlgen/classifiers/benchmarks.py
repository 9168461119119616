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

The files as people have them: ``\\`` in an image path is read as ``/``; a leading folder (NUS-WIDE's
``Flickr/``, COCO's ``train2014/``) is tried both ways, a leading ``images/`` too, and a differently cased
extension; symlinks inside the image folder are followed (containment is checked on the path as written: no
absolute path, drive or ``..``); COCO's image folders may sit in ``ROOT/images/``; a BOM, CRLF line ends,
blank lines and trailing blanks are ignored; the spec is parsed from the right, so ROOT may hold colons.
Missing images stop the split with their count and the first three names, unless the spec ends in
``:skip-missing`` (``nus-zsl:ROOT:seen-train:skip-missing``), which goes on without them.
"""

from __future__ import annotations

import functools
import io
import json
import math
import pickle
import pickletools
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mlgen.errors import MlgenError
from mlgen.labels import normalise_label

BENCHMARKS = ("coco-zsl", "nus-zsl")
SPLITS = ("seen-train", "unseen-test", "gzsl-test")
SKIP_MISSING = "skip-missing"  # the spec option that goes on without missing images
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
    skip_missing: bool = False  # go on without the images that are not there (counted, three named)

    def __str__(self) -> str:
        return (
            f"{self.benchmark}:{self.root}"
            + (f":{self.split}" if self.split else "")
            + (f":{SKIP_MISSING}" if self.skip_missing else "")
        )


@dataclass(frozen=True)
class Split:
    """One split, checked: image files (all there) with their labels, and the labels the split scores."""

    spec: Spec
    annotation: Path  # the file the labels come from
    classes: list[str]  # the split's labels (48, 17 or 65; 925, 81 or 1006)
    unseen: list[str]  # the benchmark's unseen labels
    files: list[Path]
    labels: list[tuple[str, ...]]
    skipped: tuple[str, ...] = ()  # images left out by ``skip-missing`` (as written in the annotation file)


def parse_spec(data: str | Path | None) -> Spec | None:
    """The benchmark a ``--data`` value names, or None for a plain file or folder.

    ``BENCHMARK:ROOT[:SPLIT][:skip-missing]``, read from the right: a last ``:WORD`` is a split or the option
    only when it is one of their names, so ROOT may hold colons (``coco-zsl:/mnt/c:/data``)."""
    text = str(data) if data is not None else ""
    name, sep, rest = text.partition(":")
    if not sep or name not in BENCHMARKS:
        return None
    root, split, skip = rest, None, False
    while True:
        head, sep, tail = root.rpartition(":")
        word = tail.strip().lower()
        if sep and (word in SPLITS or (name == "nus-zsl" and word in NUS_SELECTION_FILES)) and split is None:
            split = word
        elif sep and word == SKIP_MISSING and not skip:
            skip = True
        else:
            break
        root = head
    if not root or "\0" in root:
        raise MlgenError(f"{text!r}: name the benchmark's folder, e.g. {name}:/data/{name.split('-')[0]}")
    head, sep, tail = root.rpartition(":")
    if sep and tail and "/" not in tail and not _is_dir(root) and _is_dir(head):  # ROOT:typo
        raise MlgenError(f"{text}: unknown split '{tail}' (use {', '.join(SPLITS)}, and :{SKIP_MISSING})")
    try:
        folder = Path(root).expanduser()
    except RuntimeError:  # ~user of no user: the folder as written
        folder = Path(root)
    return Spec(name, folder, split, skip)


def _is_dir(text: str) -> bool:
    try:
        return bool(text) and Path(text).expanduser().is_dir()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, an unknown ~user
        return False


def with_skip_missing(data: str | Path) -> str:
    """``data`` (a benchmark spec) with the ``skip-missing`` option (``--skip-missing``)."""
    spec = parse_spec(data)
    if spec is None:
        raise MlgenError(
            f"--skip-missing is for a benchmark (coco-zsl:ROOT, nus-zsl:ROOT), not {data}: the other formats "
            "already go on without an unreadable image and count it"
        )
    return str(Spec(spec.benchmark, spec.root, spec.split, True))


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
    return _open_cached(spec.benchmark, root, split, spec.skip_missing, _stamp(spec.benchmark, root, split))


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
def _open_cached(benchmark: str, root: Path, split: str, skip_missing: bool, stamp: tuple) -> Split:
    spec = Spec(benchmark, root, split, skip_missing)
    if not spec.root.is_dir():
        raise MlgenError(f"{spec.benchmark} folder not found: {spec.root}")
    opened, missing = _open_coco(spec, split) if spec.benchmark == "coco-zsl" else _open_nus(spec, split)
    if not missing:
        return opened
    named = ", ".join(repr(name) for _, name in missing[:3]) + (", ..." if len(missing) > 3 else "")
    if not skip_missing:
        raise MlgenError(
            f"{opened.annotation}: {len(missing)} of {len(opened.files)} images are not there under "
            f"{_image_folder(spec, split)} ({named}); to go on without them, end the data spec with "
            f":{SKIP_MISSING} ({benchmark}:ROOT[:SPLIT]:{SKIP_MISSING}) or give mlgen evaluate --skip-missing"
        )
    if len(missing) == len(opened.files):
        raise MlgenError(f"{opened.annotation}: none of its {len(missing)} images is there ({named})")
    print(f"warning: {spec}: going on without {len(missing)} missing images ({named})", file=sys.stderr)
    gone = {i for i, _ in missing}
    keep = [i for i in range(len(opened.files)) if i not in gone]
    return Split(
        opened.spec,
        opened.annotation,
        opened.classes,
        opened.unseen,
        [opened.files[i] for i in keep],
        [opened.labels[i] for i in keep],
        tuple(name for _, name in missing),
    )


def _image_folder(spec: Spec, split: str) -> Path:
    if spec.benchmark == "nus-zsl":
        return spec.root / "images"
    folder = COCO_FILES[split][1]
    return spec.root / folder if (spec.root / folder).is_dir() else spec.root / "images" / folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MlgenError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # a BOM is not part of the JSON
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise MlgenError(f"{path}: not a COCO instance file ({type(err).__name__})") from None
    except MemoryError:
        raise MlgenError(f"{path}: too large to read into memory") from None
    if not isinstance(data, dict):
        raise MlgenError(f"{path}: not a COCO instance file (a JSON {type(data).__name__}, not an object)")
    return data


def _check_classes(path: Path, found: list[str], expected: list[str], what: str) -> None:
    if sorted(found) != sorted(expected) or len(set(found)) != len(found):
        extra = sorted(set(found) - set(expected))[:3]
        missing = sorted(set(expected) - set(found))[:3]
        raise MlgenError(
            f"{path}: its {len(found)} classes are not the {len(expected)} {what} of the shipped split "
            f"(not in the split: {', '.join(extra) or '-'}; missing: {', '.join(missing) or '-'})"
        )


def _open_coco(spec: Spec, split: str) -> tuple[Split, list[tuple[int, str]]]:
    name, folder = COCO_FILES[split]
    path = spec.root / "annotations" / name
    data = _read_json(path)
    labels = split_labels("coco-zsl")
    try:
        names = {c["id"]: normalise_label(str(c["name"])) for c in data["categories"]}
        images = {image["id"]: image["file_name"] for image in data["images"]}
        per_image: dict[int, list[str]] = {}
        for annotation in data["annotations"]:
            per_image.setdefault(annotation["image_id"], []).append(names[annotation["category_id"]])
        files = [_text(images[image_id], path) for image_id in per_image]
    except (KeyError, TypeError) as err:
        raise MlgenError(f"{path}: not a COCO instance file (missing {err})") from None
    what = {"seen-train": "seen classes", "unseen-test": "unseen classes", "gzsl-test": "classes"}[split]
    _check_classes(path, list(names.values()), labels[split], what)
    images_folder = spec.root / folder
    if not images_folder.is_dir() and (spec.root / "images" / folder).is_dir():  # ROOT/images/train2014
        images_folder = spec.root / "images" / folder
    found, missing = ImageFinder(images_folder, folder).locate(files, path)
    split_ = Split(
        Spec(spec.benchmark, spec.root, split, spec.skip_missing),
        path,
        labels[split],
        labels["unseen-test"],
        found,
        [tuple(dict.fromkeys(names_of)) for names_of in per_image.values()],
    )
    return split_, missing


def read_label_names(path: Path) -> list[str]:
    """A text list's names, one a line: BOM, CRLF line ends, blank lines and surrounding blanks ignored."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MlgenError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise MlgenError(f"{path}: cannot be read ({err.strerror or err})") from None
    return [normalise_label(line) for line in text.splitlines() if line.strip()]


def _open_nus(spec: Spec, split: str) -> tuple[Split, list[tuple[int, str]]]:
    names_file = spec.root / "annotations" / "Tag_all" / "all_labels.txt"
    if not names_file.is_file():
        raise MlgenError(f"label list not found: {names_file}")
    names = read_label_names(names_file)
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
    if paths.ndim == 2 and paths.shape[1:] == (1,):  # a column of names
        paths = paths[:, 0]
    if paths.ndim != 1 or paths.dtype.kind not in "USO" or len(paths) != len(targets):
        raise MlgenError(
            f"{folder / images_name}: {paths.shape} {paths.dtype} does not match {folder / labels_name}'s "
            f"{len(targets)} rows (one image path per row)"
        )
    keep = np.array([n in set(labels[split]) for n in names])
    # every row, as the official loader: on seen-train a row with no seen label is an all-negative example
    rows = [tuple(names[c] for c in np.flatnonzero((row > 0) & keep)) for row in targets]
    written = [_text(p, folder / images_name) for p in paths]
    found, missing = ImageFinder(spec.root / "images", "Flickr").locate(written, folder / images_name)
    split_ = Split(
        Spec(spec.benchmark, spec.root, split, spec.skip_missing),
        folder / labels_name,
        labels[split],
        labels["unseen-test"],
        found,
        rows,
    )
    return split_, missing


def _text(value, source: Path) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise MlgenError(f"{source}: an image path that is not UTF-8 ({value[:40]!r})") from None
    if not isinstance(value, str):
        raise MlgenError(f"{source}: holds a {type(value).__name__} where an image path belongs")
    return str(value)


_DRIVE = re.compile(r"^[A-Za-z]:")


def relative_parts(written: str) -> tuple[str, ...] | None:
    """The folders and name of an image path as written (``\\`` read as ``/``, a BOM and surrounding blanks
    dropped, ``.`` and empty parts skipped), or None when it would leave its folder: absolute, a drive
    (``C:``), a ``..`` anywhere, or a NUL byte. Nothing is resolved: symlinks inside the folder are followed."""
    text = written.replace("\\", "/").strip().lstrip("\ufeff").strip()
    if not text or text.startswith("/") or _DRIVE.match(text) or "\0" in text:
        return None
    parts = tuple(part for part in text.split("/") if part not in ("", "."))
    return parts if parts and ".." not in parts else None


def inside(root: Path, written: str, source: Path) -> Path:
    """``root`` joined with the path as written, refusing paths that leave ``root`` (absolute, a drive, ``..``).

    The check is on the path as written, so a symlink inside ``root`` (a concept folder on another disk) is
    followed wherever it points."""
    parts = relative_parts(written)
    if parts is None:
        raise MlgenError(f"{source}: image path {written!r} points outside {root} (absolute, a drive or '..')")
    return root.joinpath(*parts)


class ImageFinder:
    """The image files of a list as people have them on disk: under ``root`` as written, else with its first
    folder ``prefix`` (NUS-WIDE's ``Flickr``) dropped when written or added when ``root`` has it, else without
    a leading ``images/`` (a list written relative to the benchmark's folder), else with the extension's case
    changed (``.JPG``). The way that found the last image is tried first."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        prefix = prefix.lower()
        try:
            self.prefixes = sorted(p.name for p in root.iterdir() if p.name.lower() == prefix and p.is_dir())
        except OSError:
            self.prefixes = []
        self.prefix = prefix
        self.last = 0

    def _ways(self, parts: tuple[str, ...]) -> list[tuple[str, ...]]:
        bases = [parts, parts[1:]] if len(parts) > 1 and parts[0].lower() == "images" else [parts]
        ways = []
        for base in bases:
            ways.append(base)
            if len(base) > 1 and base[0].lower() == self.prefix:
                ways.append(base[1:])
            elif base[0].lower() != self.prefix:
                ways += [(prefix, *base) for prefix in self.prefixes]
        name, dot, suffix = parts[-1].rpartition(".")
        if dot and name:
            for case in (suffix.lower(), suffix.upper()):
                if case != suffix:
                    ways += [(*way[:-1], f"{name}.{case}") for way in list(ways)]
        return ways

    def locate(self, written: list[str], source: Path) -> tuple[list[Path], list[tuple[int, str]]]:
        """Each image's path (as written when it is nowhere) and the (index, name) of those not there."""
        files, missing = [], []
        for i, name in enumerate(written):
            first = inside(self.root, name, source)
            ways = self._ways(relative_parts(name) or ())
            order = list(range(len(ways)))
            if self.last < len(ways):  # the way that found the last image first
                order.insert(0, order.pop(self.last))
            for w in order:
                path = self.root.joinpath(*ways[w])
                if _is_file(path):
                    files.append(path)
                    self.last = w
                    break
            else:
                files.append(first)
                missing.append((i, name.strip()))
        return files, missing


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, a permission denied on the way: not an image mlgen can read
        return False


class _Pending:
    """An array being unpickled: numpy's ``_reconstruct`` is replaced by this, and its state is checked
    (shape against the file's size and the data given) before numpy allocates anything."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # bytes of pickle data in the file: no honest array has more elements
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("not an ndarray state")
        shape, dtype, _, data = state[-4:]
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"shape {shape!r} is not a shape")
        if not isinstance(dtype, np.dtype):
            raise pickle.UnpicklingError("no dtype")
        count = math.prod(shape)
        size = len(data) if isinstance(data, (list, bytes, bytearray)) else -1
        wanted = count if dtype.hasobject else count * dtype.itemsize  # values in a list, or bytes
        if count > self.limit or size != wanted:
            raise pickle.UnpicklingError(
                f"shape {shape} asks for {count:,} elements; the file holds {self.limit:,} bytes and "
                f"{max(size, 0):,} values"
            )
        array = np.ndarray.__new__(np.ndarray, (0,), np.uint8)
        array.__setstate__(state)
        self.array = array


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy's own array reconstruction and nothing else: no other global is ever resolved, and an
    array's shape is checked against the file's size before it is allocated (:class:`_Pending`)."""

    RECONSTRUCT = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")})
    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype")})

    def __init__(self, handle, limit: int) -> None:
        super().__init__(handle)
        self.limit = limit

    def find_class(self, module: str, name: str):
        if (module, name) in self.RECONSTRUCT:
            return self._reconstruct
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)

    def _reconstruct(self, subtype, shape, typecode) -> _Pending:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError("refused array subtype")
        return _Pending(self.limit)


def _check_lengths(data: bytes) -> None:
    """Every length an opcode of the pickle ``data`` gives is within ``data``: pickle's C reader allocates a
    counted bytes object (BINBYTES8) before it reads it, so a crafted length would allocate that much.
    pickletools reads the stream as it is, and stops at a length past its end."""
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError as err:
        raise pickle.UnpicklingError(f"a length past the end of the file: {err}") from None


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz (a zip of .npy files), whatever its name


def _load_npy(path: Path) -> np.ndarray:
    """A .npy file without unpickling code: numbers and fixed-width strings as they are; an object array
    (image names saved as Python strings) only through :class:`_ArraysOnly`, and only if it holds strings.

    The header's shape is checked against the file's size before anything is allocated; an .npz (also one
    renamed to .npy) is refused; running out of memory is one line."""
    if not path.is_file():
        raise MlgenError(f"annotation file not found: {path}")
    try:
        with path.open("rb") as handle:
            if handle.read(4) in ZIP_MAGIC:
                raise MlgenError(f"{path}: an .npz archive (zip), not a .npy array: save each array with numpy.save")
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f".npy format {version[0]}.{version[1]}")
            shape, _, dtype = read_header[version](handle)
            data_bytes = path.stat().st_size - handle.tell()
            count = math.prod(shape)
            if (count if dtype.hasobject else count * dtype.itemsize) > data_bytes:
                raise MlgenError(
                    f"{path}: its header says shape {shape} {dtype} ({count:,} elements) but the file holds "
                    f"{data_bytes:,} bytes of data (cut short or crafted)"
                )
            if not dtype.hasobject:
                return np.load(path, allow_pickle=False)
            data = handle.read()
            _check_lengths(data)
            loaded = _ArraysOnly(io.BytesIO(data), data_bytes).load()
    except MemoryError:
        raise MlgenError(f"{path}: too large to load into memory") from None
    except (ValueError, EOFError) as err:
        raise MlgenError(f"{path}: not a .npy array ({err})") from None
    except (OSError, pickle.UnpicklingError, AttributeError, TypeError, IndexError, KeyError) as err:
        raise MlgenError(f"{path}: an object array mlgen will not unpickle ({err})") from None
    array = loaded.array if isinstance(loaded, _Pending) else None
    if array is None or array.shape != shape or not all(isinstance(v, (str, bytes)) for v in array.ravel()):
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
