"""Reading a run directory back the way a user would: manifests, then the tars they name."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds


def planned_shards(stage_dir: Path) -> list[int]:
    return [s["shard"] for s in json.loads((stage_dir / "plan.json").read_text())["shards"]]


def manifest_keys(stage_dir: Path) -> list[str]:
    keys: list[str] = []
    for shard in planned_shards(stage_dir):
        keys += pq.read_table(stage_dir / f"{shard:05d}.parquet").column("key").to_pylist()
    return keys


def images_by_key(stage_dir: Path) -> dict[str, bytes]:
    """Every sample's image bytes, reading each tar to its end with webdataset."""
    tars = [str(stage_dir / f"{shard:05d}.tar") for shard in planned_shards(stage_dir)]
    images: dict[str, bytes] = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        assert sample["__key__"] not in images, f"duplicate key {sample['__key__']}"
        images[sample["__key__"]] = sample["jpg"]
    return images


def manifest_rows(stage_dir: Path) -> list[dict]:
    """Every planned sample's manifest row (key, prompt, labels, seed), in plan order."""
    rows: list[dict] = []
    for shard in planned_shards(stage_dir):
        rows += pq.read_table(stage_dir / f"{shard:05d}.parquet").to_pylist()
    return rows
