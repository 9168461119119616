"""Training samples for the classifier: targets in memory, images streamed from disk or features cached.

A :class:`Source` yields GLOBAL batches (the same on every rank, see :func:`mlgen.classifiers.train.fit`):
cached feature dicts when the model's trainable part sits on frozen features, else preprocessed pixels
decoded batch by batch from the shards (never all images in memory).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from mlgen.classifiers.data import AugmentedView, decodable, read_labelled
from mlgen.errors import MlgenError
from mlgen.filters.stage import image_of
from mlgen.shards.reader import finished_shards, iter_shard

Batch = tuple[Tensor | dict[str, Tensor], Tensor, Tensor | None]  # inputs, targets, scored columns
SHUFFLE_BATCHES = 8  # the streaming shuffle buffer, in batches


SURPLUS_FILE = "quota_surplus.json"  # kept images past a label's quota (quota rounds): on disk, not trained on


def surplus_samples(folder: Path) -> set[tuple[int, str]]:
    """(shard, sample key) of the images a quota merge marked as surplus (none without the file)."""
    path = folder / SURPLUS_FILE
    if not path.is_file():
        return set()
    return {(int(shard), str(key)) for shard, key in json.loads(path.read_text(encoding="utf-8"))["samples"]}


def shard_samples(folder: Path) -> Iterator[tuple[dict, bytes]]:
    """(json metadata, image bytes) of every sample of a stage's finished shards, in order (quota surplus
    left out)."""
    surplus = surplus_samples(folder)
    for shard in finished_shards(folder):
        for sample in iter_shard(folder, shard):
            if (shard, sample["__key__"]) not in surplus:
                yield json.loads(sample["json"]), image_of(sample)[1]


def labelled_samples(
    path: Path, image_folders: Sequence[Path] = ()
) -> tuple[list[tuple[str, ...]], Callable[[], Iterator[bytes]], int]:
    """(labels of each readable image, a stream of those images, count of unreadable ones) of a labelled set
    (a COCO JSON's images looked up in ``image_folders`` first)."""
    labels, skipped = [], 0
    for item in read_labelled(path, image_folders):
        if decodable(item.image):
            labels.append(item.labels)
        else:
            skipped += 1
    if not labels:
        raise MlgenError(f"{path}: no readable labelled images ({skipped} could not be read)")

    def images() -> Iterator[bytes]:
        for item in read_labelled(path, image_folders):
            if decodable(item.image):
                yield item.image

    return labels, images, skipped


def multi_hot(rows: list[list[str] | tuple[str, ...]], classes: list[str]) -> Tensor:
    index = {label: i for i, label in enumerate(classes)}
    targets = torch.zeros(len(rows), len(classes))
    for r, labels in enumerate(rows):
        targets[r, [index[label] for label in labels if label in index]] = 1
    return targets


def synthetic_targets(metas: list[dict], classes: list[str], soft: float = 0.0) -> Tensor:
    """Training targets of generated images from their sample json: 1 on each image's training ``labels`` (never
    its ``requested`` ones: under the filter's topk rule the training labels add those the teacher found).

    With ``soft`` W > 0 (He et al. 2023), every other label is trained on W x the teacher's grouping-softmax
    probability the filter stored in ``scores`` (+ (1 - W) x 0); a label the teacher did not score stays 0.
    """
    hard = multi_hot([meta["labels"] for meta in metas], classes)
    if not soft:
        return hard
    if any(not isinstance(meta.get("scores"), dict) for meta in metas):
        raise MlgenError("--soft-targets: the kept images carry no teacher scores (filter again, or --soft-targets 0)")
    probs = torch.tensor([[float(meta["scores"].get(label, 0.0)) for label in classes] for meta in metas])
    return torch.where(hard > 0, hard, soft * probs)


def drawn_columns(columns: Tensor | None, count: int, draw: int | None, seed: int) -> Tensor | None:
    """At most ``draw`` of ``columns`` (None: all ``count``), drawn at random by ``seed`` for one batch: the
    official trainer scores each real batch on 100 randomly drawn seen classes when it has more."""
    pool = torch.ones(count, dtype=torch.bool) if columns is None else columns
    if not draw or int(pool.sum()) <= draw:
        return columns
    index = pool.nonzero().flatten()
    picked = index[torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed))[:draw]]
    out = torch.zeros(count, dtype=torch.bool)
    out[picked] = True
    return out


class Source:
    """The samples ``rows`` (a boolean mask) of a set, scored on ``columns`` (a boolean mask over the classes;
    None: all), or per batch on ``draw`` of them drawn at random. Inputs: cached ``features``, or cached augmented
    ``views`` (epoch e reads view e mod K), else pixels decoded from ``images`` through ``preprocess`` (with
    ``augment``: a fresh seeded view per epoch)."""

    def __init__(
        self,
        targets: Tensor,
        rows: Tensor,
        features: dict[str, Tensor] | None = None,
        images: Callable[[], Iterator[bytes]] | None = None,
        preprocess=None,
        columns: Tensor | None = None,
        augment=None,
        views: list[dict[str, Tensor]] | None = None,
        draw: int | None = None,
    ) -> None:
        self.targets, self.rows, self.features, self.views = targets, rows, features, views
        self.images, self.preprocess, self.augment, self.columns = images, preprocess, augment, columns
        self.draw = draw

    def _columns(self, epoch: int, seed: int, batch: int) -> Tensor | None:
        """The batch's scored columns (the same on every rank: drawn from the seed, epoch and batch number)."""
        return drawn_columns(
            self.columns, self.targets.shape[1], self.draw, (seed * 100_003 + epoch) * 1_000_003 + batch
        )

    def __len__(self) -> int:
        return int(self.rows.sum())

    def batches(self, epoch: int, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[Batch]:
        """Global batches (inputs, targets, columns)."""
        features = self.views[epoch % len(self.views)] if self.views else self.features
        if features is not None:
            index = self.rows.nonzero().flatten()
            if shuffle:
                generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
                index = index[torch.randperm(index.numel(), generator=generator)]
            for b, idx in enumerate(index.split(batch_size)):
                yield {k: v[idx].float() for k, v in features.items()}, self.targets[idx], self._columns(epoch, seed, b)
            return
        yield from self._stream(epoch, batch_size, seed, shuffle)

    def _stream(self, epoch: int, batch_size: int, seed: int, shuffle: bool) -> Iterator[Batch]:
        """Pixels decoded from the stream with a seeded shuffle buffer (the same order on every rank)."""
        rng = random.Random(seed * 100_003 + epoch)
        buffer: list[tuple[int, bytes]] = []
        capacity = batch_size * SHUFFLE_BATCHES if shuffle else batch_size
        transform = AugmentedView(self.augment, epoch) if self.augment is not None else self.preprocess

        emitted = [0]

        def emit(items: list[tuple[int, bytes]]) -> Batch:
            pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for _, b in items])
            emitted[0] += 1
            return pixels, self.targets[[i for i, _ in items]], self._columns(epoch, seed, emitted[0] - 1)

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
