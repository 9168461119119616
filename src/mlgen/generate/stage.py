"""The generation stage: ``images_per_prompt`` x prompts images into WebDataset shards.

Which prompt each image renders follows one of two rules, chosen from the prompt stage's label sets:

- ``draw`` when they are the paper's (``method`` pairs: every pair of the class list, a label with itself as a
  one-label set): each image draws its label set as the official generation loop does (two picks, a repeat
  dropped, one redraw: :mod:`mlgen.generate.draw`; about 1/n² of the images are single-label), then one of that
  set's prompts. Rendering every prompt alike would make the n self pairs n of the n(n+1)/2 sets: 40% of the
  images single-label for 4 labels.
- ``per-prompt`` otherwise (``--label-sets``, ``--set-size``): the user chose the sets and their mix, so every
  prompt is rendered ``images_per_prompt`` times, as listed.
"""

from __future__ import annotations

import errno
import functools
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlgen.config import GenerateConfig
from mlgen.errors import MlgenError
from mlgen.generate.diffusion import (
    auto_batch_size,
    configure_memory,
    encode_image,
    image_side,
    load_pipeline,
    render_checked,
    sample_seed,
)
from mlgen.generate.draw import LABEL_DRAW, draw_known_set, image_rng
from mlgen.generate.presets import apply_preset
from mlgen.models.registry import torch_dtype
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage
from mlgen.progress import progress
from mlgen.shards.reader import finished_shards, read_manifest
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter

# ``failed``: why a sample has no image (nan, black); null for the samples in the tar.
RAW_SCHEMA = pa.schema([*MANIFEST_FIELDS, pa.field("failed", pa.string())])
QUEUE_BATCHES = 2  # rendered batches waiting for the writer: bounds memory, lets the GPU run ahead


def text_encoder_folder(run: RunDir, config: GenerateConfig) -> Path | None:
    """The fine-tuned text encoder to use: ``--text-encoder``, else ``RUN/text_encoder/`` when present."""
    if config.text_encoder is not None:
        folder = Path(config.text_encoder)
        if not folder.is_dir():
            raise MlgenError(f"text encoder folder not found: {folder}")
        return folder
    folder = run.root / "text_encoder"
    return folder if folder.is_dir() else None


class GenerateStage(Stage):
    name = "raw"
    config_section = "generate"
    requires = ("prompts",)

    def __init__(self, run: RunDir, config: GenerateConfig) -> None:
        config = apply_preset(config)  # steps/guidance/size/scheduler the user left unset
        super().__init__(run, config)
        self.pipe = None
        self.size = config.size
        self.device = None
        self._prompts: list[dict[str, Any]] | None = None
        self._draw: tuple[list[str], dict[frozenset, int], dict[int, list[dict[str, Any]]]] | None = None
        self.text_encoder = text_encoder_folder(run, config)
        self.text_encoder_hash = None
        self.overlap = True  # False: encode and write in the rendering thread (the reference for tests)
        if self.text_encoder is not None:
            from mlgen.finetune import text_encoder_hash

            self.text_encoder_hash = text_encoder_hash(self.text_encoder)

    def settings(self) -> dict[str, Any]:
        settings = {**super().settings(), "text_encoder_hash": self.text_encoder_hash}
        if self.draws:  # only then: a per-prompt run planned before the draw existed keeps its hash and resumes
            settings["label_draw"] = LABEL_DRAW
        return settings

    @functools.cached_property
    def draws(self) -> bool:
        """Whether images draw their label sets (the prompt stage made the paper's pairs) or render every prompt
        alike (sets the user chose: ``--label-sets``, ``--set-size``; see the module docstring)."""
        sets = pq.read_table(self.run.stage_dir("prompts") / "label_sets.parquet")
        return "method" in sets.column_names and set(sets.column("method").to_pylist()) == {"pairs"}

    @property
    def prompts(self) -> list[dict[str, Any]]:
        if self._prompts is None:
            self._prompts = pq.read_table(self.run.stage_dir("prompts") / "prompts.parquet").to_pylist()
        return self._prompts

    def plan(self) -> list[dict[str, Any]]:
        total = len(self.prompts) * self.config.images_per_prompt
        size = self.config.shard_size
        return [
            {"shard": number, "start": start, "end": min(start + size, total)}
            for number, start in enumerate(range(0, total, size))
        ]

    def setup(self, ranks: Ranks) -> None:
        c = self.config
        self.size = image_side(c.model, c.size)
        self.device = ranks.device
        self.pipe = load_pipeline(c.model, ranks.device, c.dtype, c.scheduler, c.compile, self.text_encoder)
        self.batch_size = c.batch_size or auto_batch_size(ranks.device, self.size, torch_dtype(c.dtype, ranks.device))
        configure_memory(self.pipe, ranks.device, self.size, self.batch_size)

    def samples(self, start: int, end: int) -> list[dict[str, Any]]:
        """Samples ``start:end``: drawn (:meth:`drawn_sample`) or, per prompt, sample ``i`` is image
        ``i % images_per_prompt`` of prompt ``i // images_per_prompt``."""
        if self.draws:
            return [self.drawn_sample(i) for i in range(start, end)]
        per_prompt = self.config.images_per_prompt
        out = []
        for i in range(start, end):
            prompt, image_index = self.prompts[i // per_prompt], i % per_prompt
            out.append(
                {
                    **prompt,
                    "image_index": image_index,
                    "seed": sample_seed(self.config.seed, prompt["prompt_id"], image_index),
                }
            )
        return out

    def drawn_sample(self, index: int) -> dict[str, Any]:
        """Image ``index``: a label set by the official draw, then one of its prompts, both from the run seed and
        ``index`` alone; its ``image_index`` is ``index`` (so its seed is unique even when a prompt repeats)."""
        if self._draw is None:
            by_set: dict[int, list[dict[str, Any]]] = {}
            for prompt in self.prompts:
                by_set.setdefault(prompt["set_id"], []).append(prompt)
            sets = pq.read_table(self.run.stage_dir("prompts") / "label_sets.parquet").to_pylist()
            known = {frozenset(s["labels"]): s["set_id"] for s in sets if s["set_id"] in by_set}
            self._draw = self.run.classes(), known, by_set
        classes, known, by_set = self._draw
        rng = image_rng(self.config.seed, index)
        choices = by_set[draw_known_set(rng, classes, known)]
        prompt = choices[int(rng.integers(len(choices)))]
        return {**prompt, "image_index": index, "seed": sample_seed(self.config.seed, prompt["prompt_id"], index)}

    def meta(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample's json: what made the image."""
        c = self.config
        meta = {
            "prompt_id": sample["prompt_id"],
            "set_id": sample["set_id"],
            "labels": sample["labels"],
            "image_index": sample["image_index"],
            "seed": sample["seed"],
            "model": c.model,
            "steps": c.steps,
            "guidance": c.guidance,
            "size": self.size,
            "scheduler": c.scheduler,
        }
        if self.text_encoder_hash is not None:
            meta["text_encoder_hash"] = self.text_encoder_hash
        return meta

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._run_shard(shard)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            raise MlgenError(
                f"raw shard {shard['shard']:05d} could not be written ({err.strerror}): it is not marked done; "
                "free disk space and rerun the same command to resume"
            ) from None

    def _run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        samples = self.samples(shard["start"], shard["end"])
        c = self.config
        with ShardWriter(self.folder, shard["shard"], RAW_SCHEMA) as writer:
            # Encoding and writing run in a background thread, so denoising never waits for disk.
            consume = lambda batch: self.write_batch(writer, shard["shard"], *batch)  # noqa: E731
            with BackgroundWriter(consume) if self.overlap else Inline(consume) as background:
                batches = range(0, len(samples), self.batch_size)
                for begin in progress(batches, f"shard {shard['shard']:05d}", "batch", inner=True):
                    batch = samples[begin : begin + self.batch_size]
                    images, reasons = render_checked(
                        self.pipe,
                        [s["text"] for s in batch],
                        [s["negative_text"] for s in batch],
                        [s["seed"] for s in batch],
                        c.steps,
                        self.size,
                        c.guidance,
                    )
                    background.put((begin, batch, images, reasons))
            failed = sum(1 for row in writer.rows if row["failed"])
            written = writer.commit()
        return {"images": written - failed, "failed": failed}

    def finish(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        from mlgen.generate.export import write_sizes

        write_sizes(self.folder)  # open_clip's loader reads the sample count from here
        totals = super().finish(stats)
        sizes = [
            len(row["labels"])
            for shard in finished_shards(self.folder)
            for row in read_manifest(self.folder, shard).select(["labels", "failed"]).to_pylist()
            if row["failed"] is None
        ]
        single = sum(size == 1 for size in sizes)  # read from the manifests: right for shards of any mlgen version
        return {**totals, "single_label": single, "single_label_share": round(single / len(sizes), 4) if sizes else 0.0}

    def write_batch(
        self, writer: ShardWriter, shard: int, begin: int, batch: list[dict], images: np.ndarray, reasons: list
    ) -> None:
        c = self.config
        for index, (sample, pixels, reason) in enumerate(zip(batch, images, reasons, strict=True), start=begin):
            key = f"{shard:05d}{index:04d}"
            row = {"key": key, **{k: sample[k] for k in ("prompt_id", "set_id", "labels", "text", "seed")}}
            if reason is not None:  # listed in the manifest with why, never written as an image
                writer.rows.append({**row, "failed": reason})
                continue
            record = {
                "__key__": key,
                c.image_format: encode_image(pixels, c.image_format, c.jpeg_quality),
                "txt": sample["text"],
                "json": self.meta(sample),
            }
            writer.write(record, {**row, "failed": None})


class Inline:
    """The synchronous counterpart of :class:`BackgroundWriter` (same interface)."""

    def __init__(self, consume) -> None:
        self.put = consume

    def __enter__(self) -> Inline:
        return self

    def __exit__(self, *_: object) -> None:
        pass


class BackgroundWriter:
    """Runs ``consume(item)`` for each ``put`` item in one thread, in order, through a bounded queue.

    ``put`` blocks when the queue is full (memory stays flat); a failure in the thread is raised
    in the caller at the next ``put`` or on exit, so no shard is committed after a failed write.
    """

    def __init__(self, consume, maxsize: int = QUEUE_BATCHES) -> None:
        self.consume = consume
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.consume(item)
                except BaseException as err:
                    self.error = err

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def __enter__(self) -> BackgroundWriter:
        self.thread.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error
