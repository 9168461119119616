"""Labelled real images for training and evaluation, in the three formats users have.

- a CSV with columns ``image`` (path relative to the CSV) and ``labels`` (names joined by ``|``);
- a COCO-style JSON (``images[].file_name`` relative to the JSON's folder, ``annotations[].category_id``,
  ``categories[].name``);
- a WebDataset: a ``.tar`` file or a folder of them, each sample with an image and a ``json`` holding ``labels``.

Images are yielded one at a time (bytes, not decoded), so a large set never sits in memory.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from mlgen.errors import MlgenError
from mlgen.labels import normalise_label

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class LabelledImage:
    key: str  # where it came from (a relative path or a WebDataset key), for reports
    image: bytes | None  # None when the file could not be read (counted, skipped)
    labels: tuple[str, ...]  # normalised label names


def read_labelled(path: Path) -> Iterator[LabelledImage]:
    """Every labelled image of ``path``, whose format is told by its name (one clear line if unknown)."""
    path = Path(path)
    if not path.exists():
        raise MlgenError(f"evaluation data not found: {path}")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".json":
        return _read_coco(path)
    if path.suffix.lower() == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
        return _read_webdataset(path)
    if path.is_dir() and (path / "labels.csv").is_file():  # `mlgen world render` output
        return _read_csv(path / "labels.csv")
    raise MlgenError(f"{path}: not a labelled image set (a .csv, a COCO .json, or WebDataset .tar files)")


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


def _inside(root: Path, relative: str, source: Path) -> Path:
    """``root / relative``, refusing paths that leave ``root`` (absolute paths, ``..``)."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise MlgenError(f"{source}: image path {relative!r} points outside {root}")
    return candidate


def _read_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _labels(names: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(normalise_label(name) for name in names if name.strip()))


def _read_csv(path: Path) -> Iterator[LabelledImage]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "labels"} <= set(reader.fieldnames):
            raise MlgenError(f"{path}: a labels CSV needs the columns 'image' and 'labels'")
        for row in reader:
            image = _inside(path.parent, row["image"], path)
            yield LabelledImage(row["image"], _read_file(image), _labels((row["labels"] or "").split("|")))


def _read_coco(path: Path) -> Iterator[LabelledImage]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {c["id"]: c["name"] for c in data["categories"]}
        labels: dict[int, list[str]] = {image["id"]: [] for image in data["images"]}
        for annotation in data.get("annotations", []):
            labels[annotation["image_id"]].append(names[annotation["category_id"]])
        images = [(image["id"], image["file_name"]) for image in data["images"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise MlgenError(f"{path}: not a COCO-style label file ({type(err).__name__}: {err})") from None
    for image_id, file_name in images:
        yield LabelledImage(file_name, _read_file(_inside(path.parent, file_name, path)), _labels(labels[image_id]))


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
