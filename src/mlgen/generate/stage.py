"""The generation stage: every prompt rendered ``images_per_prompt`` times into WebDataset shards."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mlgen.config import GenerateConfig
from mlgen.generate.diffusion import encode_image, image_side, load_pipeline, render, sample_seed
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter

RAW_SCHEMA = pa.schema(MANIFEST_FIELDS)


class GenerateStage(Stage):
    name = "raw"
    config_section = "generate"
    requires = ("prompts",)

    def __init__(self, run: RunDir, config: GenerateConfig) -> None:
        super().__init__(run, config)
        self.pipe = None
        self.size = config.size
        self._prompts: list[dict[str, Any]] | None = None

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
        self.size = image_side(self.config.model, self.config.size)
        self.pipe = load_pipeline(self.config.model, ranks.device, self.config.dtype)
        self.batch_size = self.config.batch_size or (16 if ranks.device.type == "cuda" else 8)

    def samples(self, start: int, end: int) -> list[dict[str, Any]]:
        """Sample ``i`` is image ``i % images_per_prompt`` of prompt ``i // images_per_prompt``."""
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

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        samples = self.samples(shard["start"], shard["end"])
        c = self.config
        with ShardWriter(self.folder, shard["shard"], RAW_SCHEMA) as writer:
            batches = range(0, len(samples), self.batch_size)
            for begin in tqdm(batches, desc=f"shard {shard['shard']:05d}", unit="batch", leave=False):
                batch = samples[begin : begin + self.batch_size]
                images = render(
                    self.pipe,
                    [s["text"] for s in batch],
                    [s["negative_text"] for s in batch],
                    [s["seed"] for s in batch],
                    c.steps,
                    self.size,
                    c.guidance,
                )
                for index, (sample, pixels) in enumerate(zip(batch, images, strict=True), start=begin):
                    key = f"{shard['shard']:05d}{index:04d}"
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
                    }
                    record = {
                        "__key__": key,
                        c.image_format: encode_image(pixels, c.image_format, c.jpeg_quality),
                        "txt": sample["text"],
                        "json": meta,
                    }
                    row = {"key": key, **{k: sample[k] for k in ("prompt_id", "set_id", "labels", "text", "seed")}}
                    writer.write(record, row)
            count = writer.commit()
        return {"images": count}
