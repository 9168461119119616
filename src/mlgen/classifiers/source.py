"""Training samples for the classifier: targets in memory, images streamed from disk or features cached.

A :class:`Source` yields GLOBAL batches (the same on every rank, see :func:`mlgen.classifiers.train.fit`):
cached feature dicts when the model's trainable part sits on frozen features, else preprocessed pixels
decoded batch by batch from the shards (never all images in memory).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from mlgen.classifiers.data import decodable, read_labelled
from mlgen.errors import MlgenError
from mlgen.filters.stage import image_of
from mlgen.shards.reader import finished_shards, iter_shard

Batch = tuple[Tensor | dict[str, Tensor], Tensor]
SHUFFLE_BATCHES = 8  # the streaming shuffle buffer, in batches


def shard_samples(folder: Path) -> Iterator[tuple[dict, bytes]]:
    """(json metadata, image bytes) of every sample of a stage's finished shards, in order."""
    for shard in finished_shards(folder):
        for sample in iter_shard(folder, shard):
            yield json.loads(sample["json"]), image_of(sample)[1]


def labelled_samples(path: Path) -> tuple[list[tuple[str, ...]], Callable[[], Iterator[bytes]], int]:
    """(labels of each readable image, a stream of those images, count of unreadable ones) of a labelled set."""
    labels, skipped = [], 0
    for item in read_labelled(path):
        if decodable(item.image):
            labels.append(item.labels)
        else:
            skipped += 1
    if not labels:
        raise MlgenError(f"{path}: no readable labelled images ({skipped} could not be read)")

    def images() -> Iterator[bytes]:
        for item in read_labelled(path):
            if decodable(item.image):
                yield item.image

    return labels, images, skipped


def multi_hot(rows: list[list[str] | tuple[str, ...]], classes: list[str]) -> Tensor:
    index = {label: i for i, label in enumerate(classes)}
    targets = torch.zeros(len(rows), len(classes))
    for r, labels in enumerate(rows):
        targets[r, [index[label] for label in labels if label in index]] = 1
    return targets


class Source:
    """The samples ``rows`` (a boolean mask) of a set: cached ``features`` if given, else streamed ``images``."""

    def __init__(
        self,
        targets: Tensor,
        rows: Tensor,
        features: dict[str, Tensor] | None = None,
        images: Callable[[], Iterator[bytes]] | None = None,
        preprocess=None,
    ) -> None:
        self.targets, self.rows, self.features = targets, rows, features
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return int(self.rows.sum())

    def batches(self, epoch: int, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[Batch]:
        if self.features is not None:
            index = self.rows.nonzero().flatten()
            if shuffle:
                generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
                index = index[torch.randperm(index.numel(), generator=generator)]
            for idx in index.split(batch_size):
                yield {k: v[idx].float() for k, v in self.features.items()}, self.targets[idx]
            return
        yield from self._stream(epoch, batch_size, seed, shuffle)

    def _stream(self, epoch: int, batch_size: int, seed: int, shuffle: bool) -> Iterator[Batch]:
        """Pixels decoded from the stream with a seeded shuffle buffer (the same order on every rank)."""
        rng = random.Random(seed * 100_003 + epoch)
        buffer: list[tuple[int, bytes]] = []
        capacity = batch_size * SHUFFLE_BATCHES if shuffle else batch_size

        def emit(items: list[tuple[int, bytes]]) -> Batch:
            pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in items])
            return pixels, self.targets[[i for i, _ in items]]

        for i, image in enumerate(self.images()):
            if not self.rows[i]:
                continue
            buffer.append((i, image))
            if len(buffer) >= capacity:
                if shuffle:
                    rng.shuffle(buffer)
                yield emit(buffer[:batch_size])
                buffer = buffer[batch_size:]
        if shuffle:
            rng.shuffle(buffer)
        for start in range(0, len(buffer), batch_size):
            yield emit(buffer[start : start + batch_size])


def mixed(first: Callable[[int], Iterator[Batch]], second: Callable[[int], Iterator[Batch]]):
    """Both sources in every epoch, their batches interleaved (the alternative to alternating epochs)."""

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        a, b = first(epoch), second(epoch)
        for batch_a in a:
            yield batch_a
            yield from _take_one(b)
        yield from a
        yield from b

    return epoch_batches


def _take_one(iterator: Iterator[Batch]) -> Iterator[Batch]:
    for batch in iterator:
        yield batch
        return
