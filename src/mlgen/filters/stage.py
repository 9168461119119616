"""The filter stage: score every generated image with CLIP, keep the exact-set matches."""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import torch
from PIL import Image

from mlgen.config import FilterConfig
from mlgen.filters.discriminator import detected, exact_set_keep, grouping_softmax, requested_mask
from mlgen.models.registry import load_open_clip
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.runner import Stage
from mlgen.shards.reader import iter_shard
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter, write_parquet_atomic

IMAGE_EXTENSIONS = ("jpg", "png", "webp")
FILTERED_SCHEMA = pa.schema([*MANIFEST_FIELDS, pa.field("scores", pa.list_(pa.float32()))])
DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("detected", pa.list_(pa.string())),
        pa.field("kept", pa.bool_()),
        pa.field("scores", pa.list_(pa.float32())),
    ]
)


def image_of(sample: dict[str, Any]) -> tuple[str, bytes]:
    ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
    return ext, sample[ext]


class FilterStage(Stage):
    """Filtered shard ``i`` holds the kept samples of raw shard ``i``; scores are for every class."""

    name = "filtered"
    config_section = "filter"
    requires = ("raw",)

    def __init__(self, run, config: FilterConfig) -> None:
        super().__init__(run, config)
        self.classes = run.classes()
        self.class_index = {label: i for i, label in enumerate(self.classes)}

    def plan(self) -> list[dict[str, Any]]:
        raw_plan = json.loads((self.run.stage_dir("raw") / "plan.json").read_text(encoding="utf-8"))
        return [{"shard": s["shard"]} for s in raw_plan["shards"]]

    def setup(self, ranks: Ranks) -> None:
        self.device = ranks.device
        self.model, self.preprocess, tokenizer = load_open_clip(self.config.clip, ranks.device)
        with torch.inference_mode():  # the paper scores bare class names
            text = self.model.encode_text(tokenizer(self.classes).to(ranks.device))
            self.text_features = torch.nn.functional.normalize(text.float(), dim=-1)
            self.logit_scale = self.model.logit_scale.exp().float()

    def logits(self, images: list[bytes]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device, self.model.logit_scale.dtype))
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            return (self.logit_scale * features @ self.text_features.T).cpu()

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        decisions: list[dict[str, Any]] = []
        raw = self.run.stage_dir("raw")
        with ShardWriter(self.folder, shard["shard"], FILTERED_SCHEMA) as writer:
            batch: list[dict[str, Any]] = []
            for sample in iter_shard(raw, shard["shard"]):
                batch.append(sample)
                if len(batch) == self.config.batch_size:
                    decisions += self.judge(batch, writer)
                    batch = []
            if batch:
                decisions += self.judge(batch, writer)
            kept = writer.commit()
        write_parquet_atomic(self.folder / f"{shard['shard']:05d}_decisions.parquet", decisions, DECISIONS_SCHEMA)
        return {"images": len(decisions), "kept": kept, "dropped": len(decisions) - kept}

    def judge(self, batch: list[dict[str, Any]], writer: ShardWriter) -> list[dict[str, Any]]:
        logits = self.logits([image_of(s)[1] for s in batch])
        metas = [json.loads(sample["json"]) for sample in batch]
        requested = requested_mask([[self.class_index[x] for x in m["labels"]] for m in metas], len(self.classes))
        probs = grouping_softmax(logits, requested)  # the whole batch at once
        found = detected(probs, requested, self.config.threshold)
        keep = exact_set_keep(probs, requested, self.config.threshold)
        decisions = []
        for sample, meta, row_probs, row_found, kept in zip(batch, metas, probs, found, keep.tolist(), strict=True):
            scores = [round(float(p), 6) for p in row_probs]
            detected_labels = [self.classes[i] for i in row_found.nonzero().flatten().tolist()]
            decisions.append(
                {
                    "key": sample["__key__"],
                    "labels": meta["labels"],
                    "detected": detected_labels,
                    "kept": kept,
                    "scores": scores,
                }
            )
            if kept:
                meta.update(
                    scores=dict(zip(self.classes, scores, strict=True)),
                    detected=detected_labels,
                    kept=True,
                    clip=self.config.clip,
                )
                ext, image = image_of(sample)
                record = {"__key__": sample["__key__"], ext: image, "txt": sample["txt"].decode("utf-8"), "json": meta}
                row = {
                    "key": sample["__key__"],
                    "prompt_id": meta["prompt_id"],
                    "set_id": meta["set_id"],
                    "labels": meta["labels"],
                    "text": record["txt"],
                    "seed": meta["seed"],
                    "scores": scores,
                }
                writer.write(record, row)
        return decisions
