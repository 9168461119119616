"""Reading a stage's finished shards through their manifests (never a glob of ``*.tar``)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from mlgen.errors import MlgenError, ShardFailed
from mlgen.pipeline.rundir import PLAN, stats_path
from mlgen.shards.writer import shard_paths


def finished_shards(folder: Path) -> list[int]:
    """Shard numbers of the plan whose stats file exists, in plan order."""
    plan_file = folder / PLAN
    if not plan_file.is_file():
        return []
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    return [s["shard"] for s in plan["shards"] if stats_path(folder, s["shard"]).exists()]


def read_manifest(folder: Path, shard: int) -> pa.Table:
    _, manifest = shard_paths(folder, shard)
    try:
        return pq.read_table(manifest)
    except (OSError, pa.ArrowInvalid) as err:
        raise MlgenError(f"corrupt or missing manifest {manifest}: {err}") from None


def iter_shard(folder: Path, shard: int) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard (``__key__`` and bytes per extension), checked against its manifest."""
    tar, _ = shard_paths(folder, shard)
    manifest = read_manifest(folder, shard)
    expected = manifest.column("key").to_pylist()
    if "failed" in manifest.column_names:  # samples that came out NaN/black are listed, with no image
        expected = [k for k, reason in zip(expected, manifest.column("failed").to_pylist(), strict=True) if not reason]
    # one explicit shard, read whole: never split among DataLoader workers (the filter's workers split it by
    # batch) nor among torchrun ranks (the runner already gives each rank its own shards)
    dataset = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False, workersplitter=None, nodesplitter=None)
    seen = 0
    try:
        for sample, key in zip(dataset, expected, strict=False):
            if sample["__key__"] != key:
                raise ShardFailed(f"corrupt shard {tar}: sample {sample['__key__']} where the manifest has {key}")
            seen += 1
            yield sample
    except (OSError, ValueError, EOFError, tarfile.TarError) as err:
        raise ShardFailed(f"corrupt shard {tar}: {err}") from None
    if seen != len(expected):
        raise ShardFailed(f"corrupt shard {tar}: {seen} samples, the manifest lists {len(expected)}")
