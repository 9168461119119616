"""Labelled real images for training and evaluation, in the three formats users have.

- a CSV with columns ``image`` (path relative to the CSV) and ``labels`` (names joined by ``|``);
- a COCO-style JSON (``images[].file_name`` relative to a folder named with ``--images``, the JSON's folder, or
  in the COCO layout, where annotations/ and the image folders such as train2014/ are siblings;
  ``annotations[].category_id``, ``categories[].name``);
- a WebDataset: a ``.tar`` file or a folder of them, each sample with an image and a ``json`` holding ``labels``;
- a split of a zero-shot benchmark in its standard layout: ``coco-zsl:ROOT:SPLIT`` or ``nus-zsl:ROOT:SPLIT``
  (:mod:`mlgen.classifiers.benchmarks`).

Images are yielded one at a time (bytes, not decoded), so a large set never sits in memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from mlgen.classifiers.benchmarks import Split, inside, open_split, parse_spec, relative_parts, split_images
from mlgen.errors import MlgenError
from mlgen.labels import normalise_label

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class LabelledImage:
    key: str  # where it came from (a relative path or a WebDataset key), for reports
    image: bytes | None  # None when the file could not be read (counted, skipped)
    labels: tuple[str, ...]  # normalised label names


def read_labelled(path: Path | str, image_folders: Sequence[Path] = ()) -> Iterator[LabelledImage]:
    """Every labelled image of ``path``, whose format is told by its name (one clear line if unknown); a COCO
    JSON's ``file_name``s are looked up in ``image_folders`` (``--images``) first.

    A benchmark split is checked whole (files, row counts, class lists, every image there) before this
    returns; the other formats are read as they are iterated."""
    spec = parse_spec(path)
    if spec is not None:
        return _read_split(open_split(spec))
    path = Path(path)
    if not path.exists():
        raise MlgenError(f"evaluation data not found: {path}")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".json":
        return _read_coco(path, image_folders)
    if path.suffix.lower() == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return _read_webdataset(path)
    if path.is_dir() and (path / "labels.csv").is_file():  # `mlgen world render` output
        return _read_csv(path / "labels.csv")
    raise MlgenError(f"{path}: not a labelled image set (a .csv, a COCO .json, or WebDataset .tar files)")


def _read_split(split: Split) -> Iterator[LabelledImage]:
    for key, image, labels in split_images(split):
        yield LabelledImage(key, image, labels)


def decodable(image: bytes | None) -> bool:
    """Whether ``image`` is bytes that decode to a picture (unreadable ones are skipped and counted)."""
    if image is None:
        return False
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return True


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _labels(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalise_label(name) for name in names if name.strip()))


def _read_csv(path: Path) -> Iterator[LabelledImage]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames:
                reader.fieldnames = [name.strip() for name in reader.fieldnames]  # "image, labels"
            if not reader.fieldnames or not {"image", "labels"} <= set(reader.fieldnames):
                raise MlgenError(f"{path}: a labels CSV needs the columns 'image' and 'labels'")
            for row in reader:
                written = (row["image"] or "").strip()
                image = _read_file(inside(path.parent, written, path)) if written else None  # none: unreadable
                yield LabelledImage(written, image, _labels((row["labels"] or "").split("|")))
    except (UnicodeDecodeError, csv.Error) as err:
        raise MlgenError(f"{path}: not a UTF-8 labels CSV ({type(err).__name__}: {err})") from None


def check_image_folders(folders: Sequence[Path], data: Sequence[str | Path | None]) -> None:
    """One clear line unless every ``--images`` folder is there and some ``data`` value is a COCO JSON (the
    only format whose images are looked up by file name in another folder)."""
    for folder in folders:
        if not Path(folder).is_dir():
            raise MlgenError(f"--images folder not found: {folder}")
    if folders and not any(value and str(value).lower().endswith(".json") for value in data):
        raise MlgenError("--images names where a COCO JSON's file_names are: give a .json as the data too")


def _read_coco(path: Path, image_folders: Sequence[Path] = ()) -> Iterator[LabelledImage]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # a BOM is not part of the JSON
        names = {c["id"]: c["name"] for c in data["categories"]}
        labels: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
        for annotation in data.get("annotations", []):
            labels[annotation["image_id"]].append(names[annotation["category_id"]])
        images = [(image["id"], image["file_name"], image.get("coco_url")) for image in data["images"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as err:
        raise MlgenError(f"{path}: not a COCO-style label file ({type(err).__name__}: {err})") from None
    except MemoryError:
        raise MlgenError(f"{path}: too large to read into memory") from None
    bad = next((name for _, name, _ in images if not isinstance(name, str)), None)
    if bad is not None:
        raise MlgenError(f"{path}: a file_name that is not a string ({bad!r})")
    hints = [name for _, name, _ in images] + [str(url) for *_, url in images if url]
    folders = list(dict.fromkeys([*map(Path, image_folders), *coco_image_folders(path, hints)]))
    for image_id, file_name, _ in images:
        inside(path.parent, file_name, path)  # refused at once if it leaves its folder (absolute, '..')
        found = _find_image(folders, file_name, path)
        yield LabelledImage(file_name, _read_file(found), _labels(labels[image_id]))


_COCO_SPLIT = re.compile(r"(?:train|val|test|minival|unlabeled)20\d\d", re.IGNORECASE)


def coco_image_folders(path: Path, hints: list[str]) -> list[Path]:
    """Where a COCO JSON's ``file_name``s may be: the JSON's own folder; in the COCO layout (the JSON in
    ``annotations/``) the sibling image folders, the one its split names first (``train2014`` from
    ``instances_train2014.json``, ``COCO_train2014_...`` file names or ``coco_url``), then ``images/<split>``,
    then the other siblings. Only folders that exist are listed; file names are never built from the hints."""
    here = path.parent
    if here.name.lower() != "annotations":
        return [here]
    try:
        siblings = sorted(p for p in here.parent.iterdir() if p.is_dir() and p != here)
    except OSError:
        return [here]
    named = {match.group(0).lower() for text in [path.stem, *hints[:1000]] for match in _COCO_SPLIT.finditer(text)}
    first = [p for p in siblings if p.name.lower() in named]
    nested = [c for p in siblings if p.name.lower() == "images" for c in sorted(p.iterdir()) if c.is_dir()]
    nested = [c for c in nested if c.name.lower() in named] + [c for c in nested if c.name.lower() not in named]
    return list(dict.fromkeys([here, *first, *nested, *siblings]))


def _find_image(folders: list[Path], file_name: str, source: Path) -> Path:
    """The first folder where ``file_name`` (as written, containment checked) is a file; else the first."""
    parts = relative_parts(file_name)
    for folder in folders:
        candidate = folder.joinpath(*parts) if parts else inside(folder, file_name, source)
        if candidate.is_file():
            if folder is not folders[0]:  # the folder of this image first for the next ones
                folders.remove(folder)
                folders.insert(0, folder)
            return candidate
    return inside(folders[0], file_name, source)


def _read_webdataset(path: Path) -> Iterator[LabelledImage]:
    tars = [path] if path.is_file() else sorted(path.glob("*.tar"))
    for tar in tars:
        try:
            for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False, nodesplitter=None):
                image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                meta = json.loads(sample["json"]) if "json" in sample else {}
                yield LabelledImage(sample["__key__"], image, _labels(meta.get("labels", [])))
        except (OSError, ValueError, tarfile.TarError) as err:
            raise MlgenError(f"corrupt WebDataset shard {tar}: {err}") from None


# --- image transforms (Diff-ZS-MLC's classifier: squash resize; training adds CutoutPIL + RandAugment) -------


def _input_size(preprocess) -> int:
    """The model's square input side, read from its open_clip preprocessing (CenterCrop or Resize)."""
    for t in getattr(preprocess, "transforms", []):
        size = getattr(t, "size", None)
        if isinstance(size, (tuple, list)) and size:
            return int(size[0])
    for t in getattr(preprocess, "transforms", []):
        if isinstance(getattr(t, "size", None), int):
            return int(t.size)
    raise ValueError(f"cannot read the input size from {preprocess!r}")


def _normalize(preprocess):
    from torchvision import transforms as T

    found = [t for t in getattr(preprocess, "transforms", []) if isinstance(t, T.Normalize)]
    if not found:
        raise ValueError(f"no Normalize in {preprocess!r}")
    return found[-1]


def squash_transform(preprocess, interpolation: str = "bicubic"):
    """The model's preprocessing with the official squash ``Resize((S, S))`` instead of resize + centre crop:
    the whole image is seen, its aspect ratio not kept (as the official test transform). ``bilinear``: the
    official test transform's own interpolation (torchvision's default, benchmark evaluation); ``bicubic``:
    CLIP's, mlgen's default elsewhere."""
    from torchvision import transforms as T

    size = _input_size(preprocess)
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    resize = T.Resize((size, size), interpolation=mode, antialias=True)
    return T.Compose([resize, _RGB(), T.ToTensor(), _normalize(preprocess)])


def train_transform(preprocess):
    """The official training transform: squash resize, CutoutPIL (half the side), RandAugment (torchvision)."""
    from torchvision import transforms as T

    size = _input_size(preprocess)
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    return T.Compose([_RGB(), resize, Cutout(0.5), T.RandAugment(), T.ToTensor(), _normalize(preprocess)])


class _RGB:
    def __call__(self, image: Image.Image) -> Image.Image:
        return image.convert("RGB")


class Cutout:
    """ASL's CutoutPIL: one rectangle of ``factor`` x the sides, centred at a random point (clipped at the
    border), filled with a random colour. Draws from torch's generator so a seeded view is reproducible."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def __call__(self, image: Image.Image) -> Image.Image:
        from PIL import ImageDraw

        image = image.copy()
        w, h = image.size
        cut_w, cut_h = int(self.factor * w + 0.5), int(self.factor * h + 0.5)
        x_c, y_c = int(torch.randint(w, ())), int(torch.randint(h, ()))
        x1, x2 = max(x_c - cut_w // 2, 0), min(x_c + cut_w // 2, w)
        y1, y2 = max(y_c - cut_h // 2, 0), min(y_c + cut_h // 2, h)
        fill = tuple(int(v) for v in torch.randint(256, (3,)))
        ImageDraw.Draw(image).rectangle([x1, y1, x2, y2], fill=fill)
        return image


class AugmentedView:
    """View ``view`` of an image under ``transform``: the random draws are seeded by the image's pixels and
    the view number, so every rank, every rerun and the feature cache see the same augmented view."""

    def __init__(self, transform, view: int) -> None:
        self.transform, self.view = transform, view

    def __call__(self, image: Image.Image) -> torch.Tensor:
        digest = hashlib.sha256(image.convert("RGB").tobytes() + self.view.to_bytes(8, "little")).digest()
        seed = int.from_bytes(digest[:7], "little")  # below 2**63: torch's seed range
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)
