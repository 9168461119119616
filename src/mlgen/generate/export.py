"""Shard folders as other tools read them: ``sizes.json`` (open_clip) and COCO-style label JSON."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from mlgen.errors import MlgenError
from mlgen.paths import write_json_atomic
from mlgen.shards.reader import finished_shards, read_manifest
from mlgen.shards.writer import shard_paths

IMAGE_EXTENSIONS = (".jpg", ".png", ".webp")


def _kept_keys(folder: Path, shard: int) -> list[dict[str, Any]]:
    """The manifest rows of the samples the tar holds (failed ones have no image)."""
    rows = read_manifest(folder, shard).to_pylist()
    return [row for row in rows if not row.get("failed")]


def write_sizes(folder: Path) -> Path:
    """``sizes.json``: samples per tar, which open_clip's WebDataset loader reads to count a dataset."""
    sizes = {shard_paths(folder, s)[0].name: len(_kept_keys(folder, s)) for s in finished_shards(folder)}
    write_json_atomic(folder / "sizes.json", sizes)
    return folder / "sizes.json"


def coco_labels(folder: Path, classes: list[str]) -> dict[str, Any]:
    """COCO-style label JSON of a shard folder: images (file ``TAR/KEY.EXT``), categories, one
    annotation per label; filtered folders add each image's per-label confidences (``scores``)."""
    shards = finished_shards(folder)
    if not shards:
        raise MlgenError(f"{folder} has no finished shards to export")
    category = {label: i + 1 for i, label in enumerate(classes)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for shard in shards:
        tar = shard_paths(folder, shard)[0]
        with tarfile.open(tar) as archive:  # member names give each image's extension
            files = {name.split(".")[0]: name for name in archive.getnames() if name.endswith(IMAGE_EXTENSIONS)}
        for row in _kept_keys(folder, shard):
            image_id = len(images) + 1
            file_name = f"{tar.name}/{files[row['key']]}"
            image = {"id": image_id, "file_name": file_name, "key": row["key"], "text": row["text"]}
            if row.get("scores") is not None:
                image["scores"] = {label: float(p) for label, p in zip(classes, row["scores"], strict=True)}
            images.append(image)
            for label in row["labels"]:
                if label not in category:
                    raise MlgenError(f"{folder}: label '{label}' is not in the run's classes.txt")
                annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category[label]}
                if "scores" in image:
                    annotation["score"] = image["scores"][label]
                annotations.append(annotation)
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": label} for label, i in category.items()],
    }


def export(folder: Path, out: Path, fmt: str, classes: list[str]) -> dict[str, int]:
    if fmt == "coco":
        data = coco_labels(folder, classes)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, data)
        return {"images": len(data["images"]), "annotations": len(data["annotations"])}
    if fmt == "sizes":
        if not finished_shards(folder):
            raise MlgenError(f"{folder} has no finished shards to export")
        sizes = json.loads(write_sizes(folder).read_text(encoding="utf-8"))
        return {"shards": len(sizes), "samples": sum(sizes.values())}
    raise MlgenError(f"unknown export format '{fmt}': use coco or sizes")
