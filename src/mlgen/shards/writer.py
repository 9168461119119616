"""Writing one WebDataset shard and its Parquet manifest, never leaving a partial file in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from mlgen.paths import temp_sibling

# Columns every manifest has; stages add their own (scores, decisions) after these.
MANIFEST_FIELDS = [
    pa.field("key", pa.string()),
    pa.field("prompt_id", pa.int64()),
    pa.field("set_id", pa.int64()),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("text", pa.string()),
    pa.field("seed", pa.int64()),
]


def shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    """The tar and the manifest of shard number ``shard``."""
    return folder / f"{shard:05d}.tar", folder / f"{shard:05d}.parquet"


def write_parquet_atomic(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Collects the samples of one shard; :meth:`commit` moves the tar, then the manifest, into place.

    Sample dicts follow WebDataset: ``__key__`` plus one entry per extension (``jpg`` bytes,
    ``txt`` str, ``json`` dict). The stats file, written by the runner after ``commit``, is what
    marks the shard done, so a crash at any point leaves a shard that will simply be redone.
    """

    def __init__(self, folder: Path, shard: int, schema: pa.Schema) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tar_path, self.manifest_path = shard_paths(folder, shard)
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self._tmp_tar = temp_sibling(self.tar_path)
        self._tar = wds.TarWriter(str(self._tmp_tar))

    def write(self, sample: dict[str, Any], row: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.rows.append(row)

    def commit(self) -> int:
        self._tar.close()
        with open(self._tmp_tar, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_tar, self.tar_path)
        write_parquet_atomic(self.manifest_path, self.rows, self.schema)
        return len(self.rows)

    def abort(self) -> None:
        try:
            self._tar.close()  # may fail again (a full disk): the temp file goes all the same
        except OSError:
            pass
        finally:
            self._tmp_tar.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()
