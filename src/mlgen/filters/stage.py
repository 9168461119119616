"""The filter stage: score every generated image with CLIP, keep the exact-set matches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mlgen.config import FilterConfig
from mlgen.errors import MlgenError
from mlgen.filters.discriminator import detected, exact_set_keep, grouping_softmax, requested_mask
from mlgen.filters.loader import Batch, batches, decoded_batches, image_of
from mlgen.filters.s3 import s3_scores
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_atomic
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.runner import Stage
from mlgen.shards.reader import iter_shard
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter, write_parquet_atomic

TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.", "a close-up photo of a {}.", "{}")
FILTERED_SCHEMA = pa.schema([*MANIFEST_FIELDS, pa.field("scores", pa.list_(pa.float32()))])
DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("detected", pa.list_(pa.string())),
        pa.field("kept", pa.bool_()),
        pa.field("reason", pa.string()),  # "" when kept; else missing:<label> / extra:<label>, comma-joined
        pa.field("scores", pa.list_(pa.float32())),
    ]
)


def rejection_reason(labels: list[str], detected_labels: list[str]) -> str:
    """Why an image was dropped: requested labels CLIP did not find, and labels it found unasked."""
    missing = [f"missing:{label}" for label in labels if label not in detected_labels]
    extra = [f"extra:{label}" for label in detected_labels if label not in labels]
    return ",".join(missing + extra)


class EmbeddingCache:
    """Image embeddings of each raw shard (float16), kept OUTSIDE ``filtered/`` so that redoing the
    filter with another threshold or rule (``--rescore``, ``--overwrite``) never runs the image encoder again.

    Keyed by the CLIP model and the raw stage's settings hash: other images or another CLIP miss.
    """

    def __init__(self, run_root: Path, clip: str, raw_hash: str) -> None:
        key = hashlib.sha256(f"{clip}\n{raw_hash}".encode()).hexdigest()[:16]
        self.folder = run_root / "cache" / "clip-embeddings" / key

    def path(self, shard: int) -> Path:
        return self.folder / f"{shard:05d}.npz"

    def load(self, shard: int) -> tuple[list[str], torch.Tensor] | None:
        if not self.path(shard).is_file():
            return None
        with np.load(self.path(shard), allow_pickle=False) as data:
            return data["keys"].tolist(), torch.from_numpy(data["embeddings"].astype(np.float32))

    def save(self, shard: int, keys: list[str], embeddings: torch.Tensor) -> None:
        arrays = {"keys": np.array(keys), "embeddings": embeddings.numpy().astype(np.float16)}

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, **arrays)

        write_atomic(self.path(shard), write)

    def text_path(self, key: str) -> Path:
        return self.folder / f"text-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"

    def load_text(self, key: str) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(logit scale, text features) saved under ``key`` (CLIP, text side, classes, synonyms), or None."""
        if not self.text_path(key).is_file():
            return None
        with np.load(self.text_path(key), allow_pickle=False) as data:
            count = len(data.files) - 1
            return torch.from_numpy(data["scale"]), [torch.from_numpy(data[f"f{i}"]) for i in range(count)]

    def save_text(self, key: str, scale: torch.Tensor, features: list[torch.Tensor]) -> None:
        arrays = {"scale": scale.cpu().numpy(), **{f"f{i}": f.cpu().numpy() for i, f in enumerate(features)}}

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, **arrays)

        write_atomic(self.text_path(key), write)


class FilterStage(Stage):
    """Filtered shard ``i`` holds the kept samples of raw shard ``i``; scores are for every class."""

    name = "filtered"
    config_section = "filter"
    requires = ("raw",)

    def __init__(self, run, config: FilterConfig, rescore: bool = False) -> None:
        super().__init__(run, config)
        self.classes = run.classes()
        self.class_index = {label: i for i, label in enumerate(self.classes)}
        self.rescore = rescore  # decide from cached embeddings only; never run the image encoder
        self.cache = EmbeddingCache(run.root, config.clip, run.require("raw")["config_hash"])

    def plan(self) -> list[dict[str, Any]]:
        raw_plan = json.loads((self.run.stage_dir("raw") / "plan.json").read_text(encoding="utf-8"))
        return [{"shard": s["shard"]} for s in raw_plan["shards"]]

    def setup(self, ranks: Ranks) -> None:
        self.device = ranks.device
        if self.config.text not in ("bare", "ensemble", "s3"):
            raise MlgenError(f"filter text side '{self.config.text}' is not one of bare, ensemble, s3")
        words = self.synonyms() if self.config.text == "s3" else None
        key = json.dumps([self.config.clip, self.config.text, self.classes, words, TEMPLATES])
        # --rescore with a text side used before needs no CLIP at all: its text features are cached too
        cached = self.cache.load_text(key) if self.rescore else None
        if cached is None:
            self.model, self.preprocess, tokenizer = load_open_clip(self.config.clip, ranks.device)
            scale = self.model.logit_scale.exp().float().detach()
            with torch.inference_mode():
                features = self.text_side(tokenizer, words)
            self.cache.save_text(key, scale, features)
        else:
            scale, features = cached
        self.logit_scale = scale.to(self.device)
        features = [f.to(self.device) for f in features]
        self.synonym_features: list[torch.Tensor] | None = features if words is not None else None
        self.text_features = features[0]

    def text_side(self, tokenizer: Any, words: list[list[str]] | None) -> list[torch.Tensor]:
        """[C, D] class embeddings (bare, ensemble), or each class's synonym embeddings (s3)."""
        if words is not None:
            return [self.embed_texts(tokenizer, w) for w in words]
        if self.config.text == "bare":  # the paper: bare class names
            return [self.embed_texts(tokenizer, self.classes)]
        # ensemble: one mean embedding per class over the templates
        per_template = [self.embed_texts(tokenizer, [t.format(c) for c in self.classes]) for t in TEMPLATES]
        return [torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)]

    def embed_texts(self, tokenizer: Any, texts: list[str]) -> torch.Tensor:
        features = self.model.encode_text(tokenizer(texts).to(self.device))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def synonyms(self) -> list[list[str]]:
        """Each class's name and its synonyms from the prompt stage (S^3 point sets)."""
        path = self.run.stage_dir("prompts") / "synonyms.parquet"
        if not path.is_file():
            raise MlgenError(f"--text s3 needs the prompt stage's synonyms: {path} is missing (run `mlgen prompts`)")
        words = {label: [label] for label in self.classes}
        for row in pq.read_table(path, columns=["label", "synonym"]).to_pylist():
            if row["label"] in words and row["synonym"] not in words[row["label"]]:
                words[row["label"]].append(row["synonym"])
        return [words[label] for label in self.classes]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP logits [N, C] of normalised image embeddings under the chosen text side."""
        features = features.to(self.device)
        if self.synonym_features is not None:
            return self.logit_scale * s3_scores(features, self.synonym_features)
        return self.logit_scale * features @ self.text_features.T

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, CPU) of preprocessed images."""
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device, self.model.logit_scale.dtype))
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def samples(self, number: int, cached: bool) -> Iterator[Batch | tuple[list[dict[str, Any]], None]]:
        """The batches of raw shard ``number``: with pixels decoded in DataLoader workers, or none if cached."""
        raw = self.run.stage_dir("raw")
        if cached:
            return ((samples, None) for samples in batches(iter_shard(raw, number), self.config.batch_size))
        return decoded_batches(raw, number, self.config.batch_size, self.preprocess, self.config.workers)

    def cached(self, shard: int) -> tuple[list[str], torch.Tensor] | None:
        cached = self.cache.load(shard)
        if cached is None and self.rescore:
            raise MlgenError(f"--rescore: no cached image embeddings for raw shard {shard}: run `mlgen filter` first")
        return cached

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        number, decisions = shard["shard"], []
        self.seen: dict[tuple[str, ...], list[torch.Tensor]] = {}  # kept embeddings per label set (dedup)
        cached = self.cached(number)
        keys, computed = [], []
        with ShardWriter(self.folder, number, FILTERED_SCHEMA) as writer:
            for batch, pixels in self.samples(number, cached is not None):
                batch_keys = [sample["__key__"] for sample in batch]
                if cached is not None:
                    start = len(keys)
                    if cached[0][start : start + len(batch)] != batch_keys:
                        raise MlgenError(f"cached embeddings of raw shard {number} do not match it: filter --overwrite")
                    features = cached[1][start : start + len(batch)]
                else:  # rounded as cached, so a rescore with the same settings repeats every decision
                    features = self.encode(pixels).half().float()
                    computed.append(features)
                keys += batch_keys
                decisions += self.judge(batch, features, writer)
            kept = writer.commit()
        if computed:
            self.cache.save(number, keys, torch.cat(computed))
        write_parquet_atomic(self.folder / f"{number:05d}_decisions.parquet", decisions, DECISIONS_SCHEMA)
        return {"images": len(decisions), "kept": kept, "dropped": len(decisions) - kept}

    def duplicate(self, labels: list[str], feature: torch.Tensor) -> bool:
        """--dedup: a kept image nearly identical (cosine > dedup) to an earlier kept one of the same label set."""
        if self.config.dedup <= 0:
            return False
        seen = self.seen.setdefault(tuple(sorted(labels)), [])
        unit = torch.nn.functional.normalize(feature.float(), dim=-1)
        if seen and float((torch.stack(seen) @ unit).max()) > self.config.dedup:
            return True
        seen.append(unit)
        return False

    def judge(self, batch: list[dict[str, Any]], features: torch.Tensor, writer: ShardWriter) -> list[dict[str, Any]]:
        logits = self.logits(features)
        metas = [json.loads(sample["json"]) for sample in batch]
        unknown = {label for meta in metas for label in meta["labels"]} - self.class_index.keys()
        if unknown:
            raise MlgenError(
                f"raw sample {batch[0]['__key__']}...: label '{sorted(unknown)[0]}' is not in "
                f"{self.run.classes_file}; the raw images were made for other classes"
            )
        requested = requested_mask([[self.class_index[x] for x in m["labels"]] for m in metas], len(self.classes))
        probs = grouping_softmax(logits, requested)  # the whole batch at once
        found = detected(probs, requested, self.config.threshold)
        keep = exact_set_keep(probs, requested, self.config.threshold)
        decisions = []
        rows = zip(batch, metas, probs, found, keep.tolist(), features, strict=True)
        for sample, meta, row_probs, row_found, kept, feature in rows:
            scores = [round(float(p), 6) for p in row_probs]
            detected_labels = [self.classes[i] for i in row_found.nonzero().flatten().tolist()]
            reason = "" if kept else rejection_reason(meta["labels"], detected_labels)
            if kept and self.duplicate(meta["labels"], feature):
                kept, reason = False, "duplicate"
            decisions.append(
                {
                    "key": sample["__key__"],
                    "labels": meta["labels"],
                    "detected": detected_labels,
                    "kept": kept,
                    "reason": reason,
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
