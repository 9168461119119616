"""The experiment's real data and models: the toy worlds' rendered sets, or a user's own files.

- ``--world toy``: the headroom world (colours shared in pairs, one salient shape and small ones) with the
  ``toy-headroom`` teacher CLIP and the ``toy-headroom-2`` text-to-image model; ``--world toy-classic``: the
  classic world (colour names the class) with the ``toy`` models, whose CLIP is an oracle there.
- Every seed draws its own test scenes from the ``test`` stream (all shapes), so the intervals over seeds hold
  the test sampling too; its validation scenes from the ``val`` stream (all shapes: checkpoints are chosen
  there, never on test), its seen-label images from ``seen``, the oracle's unseen-label images from
  ``oracle`` and the probe's images of every label from ``probe``.
- Without a world: ``data`` (test, the same for every seed), ``seen_data``, optionally ``oracle_data`` and
  ``val_data`` are the user's files.

Real labelled images become a stage folder (:class:`ImportStage`) so that the oracle and seen-only arms train
through the same classifier stage as the generated ones.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlgen.classifiers.benchmarks import data_exists
from mlgen.classifiers.data import decodable, read_labelled
from mlgen.config import ExperimentConfig
from mlgen.errors import MlgenError
from mlgen.labels import parse_labels
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage, run_stage
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter

# --world NAME: (rendering world, CLIP, text-to-image model)
WORLDS = {
    "toy": ("headroom", "toy-headroom", "toy-headroom-2"),
    "toy-classic": ("classic", "toy", "toy"),
    "toy-named": ("headroom", "toy-named", "toy-headroom-2"),  # a teacher that knows every label's name
}


@dataclass(frozen=True)
class Setup:
    """What an experiment runs on, resolved from its settings."""

    world: str | None  # the rendering world (headroom, classic) or None for the user's data
    clip: str
    model: str
    unseen: list[str]
    seen: list[str]

    @property
    def classes(self) -> list[str]:
        """The evaluation labels: unseen first, then seen (the order the classifier stage uses)."""
        return self.unseen + self.seen


def _labels(text: str | None, what: str) -> list[str]:
    return parse_labels("\n".join(part for part in (text or "").split(",")), what) if text else []


def resolve(config: ExperimentConfig) -> Setup:
    """Models and label lists, checked: a label outside the world, or both seen and unseen, is one line."""
    unseen = _labels(config.unseen, "--unseen")
    if not unseen:
        raise MlgenError("--unseen names no label: pass the unseen labels, e.g. --unseen circle,triangle")
    if config.world is None:
        return _user_setup(config, unseen)
    if config.world not in WORLDS:
        raise MlgenError(f"unknown --world '{config.world}': use one of {', '.join(WORLDS)} (or none with --data)")
    from mlgen.world.render import SHAPES

    world, clip, model = WORLDS[config.world]
    seen = _labels(config.seen, "--seen") or [s for s in SHAPES if s not in unseen]
    for label in unseen + seen:
        if label not in SHAPES:
            raise MlgenError(f"label '{label}' is not in the toy world (its shapes: {', '.join(SHAPES)})")
    _disjoint(unseen, seen)
    return Setup(world, config.clip or clip, config.model or model, unseen, sorted(seen))


def _user_setup(config: ExperimentConfig, unseen: list[str]) -> Setup:
    if not (config.data and config.seen_data and config.clip and config.model):
        raise MlgenError("without --world, pass --data, --seen-data, --clip and --model (your own data and models)")
    for path in (config.data, config.seen_data, config.oracle_data, config.val_data, config.probe_data):
        if path and not data_exists(path):
            raise MlgenError(f"not found: {path}")
    seen = _labels(config.seen, "--seen") or sorted(
        {x for item in read_labelled(Path(config.seen_data)) for x in item.labels}
    )
    _disjoint(unseen, seen)
    return Setup(None, config.clip, config.model, unseen, sorted(seen))


def _disjoint(unseen: list[str], seen: list[str]) -> None:
    both = [label for label in unseen if label in seen]
    if both:
        raise MlgenError(f"label '{both[0]}' is listed as both seen and unseen")


def test_set(config: ExperimentConfig, setup: Setup, root: Path, seed: int) -> Path:
    """The seed's real test set: the user's (the same for every seed), or rendered (all labels, ``test``
    stream, the seed's own draw)."""
    if setup.world is None:
        return Path(config.data)
    return _rendered(root / "data" / f"test-{seed}", config.test_images, seed, setup.classes, setup.world, "test")


def val_set(config: ExperimentConfig, setup: Setup, root: Path, seed: int) -> Path | None:
    """The seed's validation set (all labels, ``val`` stream), the user's ``val_data``, or None."""
    if setup.world is None:
        return Path(config.val_data) if config.val_data else None
    return _rendered(root / "data" / f"val-{seed}", config.val_images, seed, setup.classes, setup.world, "val")


def seen_set(config: ExperimentConfig, setup: Setup, root: Path, seed: int) -> Path:
    if setup.world is None:
        return Path(config.seen_data)
    return _rendered(root / "data" / f"seen-{seed}", config.seen_images, seed, setup.seen, setup.world, "seen")


def oracle_set(config: ExperimentConfig, setup: Setup, root: Path, seed: int) -> Path:
    if setup.world is None:
        if not config.oracle_data:
            raise MlgenError("the oracle arm needs --oracle-data (real labelled images of the unseen labels)")
        return Path(config.oracle_data)
    return _rendered(root / "data" / f"oracle-{seed}", config.oracle_images, seed, setup.unseen, setup.world, "oracle")


def probe_set(config: ExperimentConfig, setup: Setup, root: Path, seed: int) -> Path:
    """The probe arm's real images of every label: the ``probe`` stream (all shapes), or the user's
    ``probe_data``."""
    if setup.world is None:
        if not config.probe_data:
            raise MlgenError("the probe arm needs --probe-data (real labelled images of every label)")
        return Path(config.probe_data)
    return _rendered(root / "data" / f"probe-{seed}", config.probe_images, seed, setup.classes, setup.world, "probe")


def _rendered(out: Path, n: int, seed: int, labels: list[str], world: str, stream: str) -> Path:
    from mlgen.world.render import render_dataset

    if not (out / "labels.csv").is_file():  # labels.csv is written last: the folder is complete
        render_dataset(out, n, seed, labels, world=world, stream=stream)
    return out / "labels.csv"


@dataclass(frozen=True)
class ImportConfig:
    data: str  # a labelled set (labels CSV, COCO JSON or WebDataset)
    labels: tuple[str, ...]  # the labels kept (others are dropped from each image)


class ImportStage(Stage):
    """Real labelled images as a stage folder (``filtered`` by default), read like generated shards."""

    name = "filtered"
    config_section = "import"

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": 0}]

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        schema = __import__("pyarrow").schema(MANIFEST_FIELDS)
        keep = set(self.config.labels)
        with ShardWriter(self.folder, shard["shard"], schema) as writer:
            for index, item in enumerate(read_labelled(Path(self.config.data))):
                labels = [label for label in item.labels if label in keep]
                if not labels or not decodable(item.image):
                    continue
                key = f"{shard['shard']:05d}{index:06d}"
                meta = {"prompt_id": index, "set_id": index, "labels": labels, "source": "real"}
                writer.write(
                    {"__key__": key, "png": _png(item.image), "json": json.dumps(meta).encode()},
                    {"key": key, "prompt_id": index, "set_id": index, "labels": labels, "text": "", "seed": 0},
                )
            images = writer.commit()
        return {"kept": images}


def _png(image: bytes) -> bytes:
    from PIL import Image

    if image[:8] == b"\x89PNG\r\n\x1a\n":
        return image
    out = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def import_run(run: RunDir, data: Path, labels: list[str]) -> RunDir:
    """A run whose ``filtered`` stage holds the real images of ``labels`` in ``data`` (classes = ``labels``)."""
    run.write_classes(labels)
    run_stage(ImportStage(run, ImportConfig(str(data), tuple(labels))))
    return run


@dataclass(frozen=True)
class MatchedConfig:
    seed: int  # the draw of each label set's subset


class MatchedStage(Stage):
    """``no-filter-matched``'s images: for every label set, a seeded random subset of the raw (unfiltered) images
    of the same size as the set's kept images. Against ``mlgen`` it says whether the filter chooses better
    images than chance at the same count; against ``no-filter``, whether more images help."""

    name = "matched"
    config_section = "matched"
    requires = ("raw", "filtered")

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": 0}]

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        import random
        from collections import Counter

        from mlgen.classifiers.source import shard_samples
        from mlgen.shards.reader import finished_shards, iter_shard

        kept = Counter(meta["set_id"] for meta, _ in shard_samples(self.run.stage_dir("filtered")))
        raw = self.run.stage_dir("raw")
        by_set: dict[int, list[tuple[int, str]]] = {}
        for number in finished_shards(raw):
            for sample in iter_shard(raw, number):
                by_set.setdefault(json.loads(sample["json"])["set_id"], []).append((number, sample["__key__"]))
        rng = random.Random(self.config.seed)
        chosen = {item for set_id in sorted(by_set) for item in rng.sample(by_set[set_id], kept[set_id])}
        schema = __import__("pyarrow").schema(MANIFEST_FIELDS)
        with ShardWriter(self.folder, shard["shard"], schema) as writer:
            for number in finished_shards(raw):
                for sample in iter_shard(raw, number):
                    if (number, sample["__key__"]) not in chosen:
                        continue
                    meta = json.loads(sample["json"])
                    row = {field.name: meta.get(field.name) for field in MANIFEST_FIELDS}
                    text = sample.get("txt", b"")
                    text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
                    writer.write(sample, {**row, "key": sample["__key__"], "text": text})
            images = writer.commit()
        return {"kept": images}
