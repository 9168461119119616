"""Raw shards in batches, their images decoded and preprocessed in DataLoader workers while CLIP runs."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlgen.errors import MlgenError, ShardFailed
from mlgen.shards.reader import iter_shard
from mlgen.shards.writer import shard_paths

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
Batch = tuple[list[dict[str, Any]], torch.Tensor]  # the samples, and their pixels [N, 3, H, W]


def image_of(sample: dict[str, Any]) -> tuple[str, bytes]:
    ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
    return ext, sample[ext]


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last may be shorter); itertools.batched needs Python 3.12."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def pixels_of(samples: list[dict[str, Any]], preprocess: Callable, where: str = "a raw shard") -> torch.Tensor:
    """The preprocessed images of ``samples`` (read from ``where``), stacked."""
    pixels = []
    for sample in samples:
        try:
            image = Image.open(io.BytesIO(image_of(sample)[1])).convert("RGB")
        except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise ShardFailed(f"corrupt image {sample['__key__']} in {where}: {err}") from None
        pixels.append(preprocess(image))
    return torch.stack(pixels)


class DecodedShard(IterableDataset):
    """One raw shard's samples in batches, each with its pixels.

    Worker ``w`` of ``W`` decodes batches w, w+W, ... (each worker reads the whole tar, cheap next
    to decoding); the DataLoader takes batches from its workers in turn, so they arrive in shard
    order. An error is handed back as an item, to be raised in the main process (an exception
    raised in a worker would come back as another object, with the worker's traceback in its text).
    """

    def __init__(self, folder: Path, shard: int, batch_size: int, preprocess: Callable) -> None:
        self.folder, self.shard, self.batch_size, self.preprocess = folder, shard, batch_size, preprocess

    def __iter__(self) -> Iterator[Batch | MlgenError]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for index, samples in enumerate(batches(iter_shard(self.folder, self.shard), self.batch_size)):
                if index % workers == worker:
                    yield samples, pixels_of(samples, self.preprocess, str(shard_paths(self.folder, self.shard)[0]))
        except MlgenError as err:
            yield err


def unchanged(item: Any) -> Any:
    return item


def decoded_batches(folder: Path, shard: int, batch_size: int, preprocess: Callable, workers: int) -> Iterator[Batch]:
    """The batches of :class:`DecodedShard`, decoded by ``workers`` processes (0: in this one)."""
    loader = DataLoader(
        DecodedShard(folder, shard, batch_size, preprocess),
        batch_size=None,
        num_workers=workers,
        collate_fn=unchanged,
        prefetch_factor=2 if workers else None,
    )
    for item in loader:
        if isinstance(item, MlgenError):
            raise item
        yield item
