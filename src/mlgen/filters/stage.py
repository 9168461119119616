"""The filter stage: score every generated image with CLIP, keep those that show what was asked for."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from mlgen.config import FilterConfig
from mlgen.errors import MlgenError, ShardFailed
from mlgen.filters.decide import fallback, parents_of, rule_topk, topk_keep
from mlgen.filters.discriminator import detected, exact_set_keep, grouping_softmax, requested_mask
from mlgen.filters.loader import decoded_batches, image_of
from mlgen.filters.text import TextSide
from mlgen.labels import alias_setting, read_aliases, read_labels
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_atomic, write_json_atomic
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.runner import Stage
from mlgen.shards.reader import iter_shard, read_manifest
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter, write_parquet_atomic

RELIABILITY = "reliability.json"  # per label: how well the teacher reads each of its names
FILTERED_SCHEMA = pa.schema(
    [*MANIFEST_FIELDS, pa.field("requested", pa.list_(pa.string())), pa.field("scores", pa.list_(pa.float32()))]
)
DECISIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("detected", pa.list_(pa.string())),
        pa.field("kept", pa.bool_()),
        # comma-joined: missing:<label> / extra:<label> (dropped), duplicate, fallback (kept: added back so the
        # label is not emptied), gated:<label> (that label was not judged: the teacher cannot read it)
        pa.field("reason", pa.string()),
        pa.field("scores", pa.list_(pa.float32())),
    ]
)


def rejection_reason(labels: list[str], detected_labels: list[str]) -> str:
    """Why an image was dropped: requested labels CLIP did not find, and labels it found unasked."""
    missing = [f"missing:{label}" for label in labels if label not in detected_labels]
    extra = [f"extra:{label}" for label in detected_labels if label not in labels]
    return ",".join(missing + extra)


SHIPPED_PARENTS = {"nus-wide": "nus_81_parents"}  # --parents NAME: a table shipped beside the benchmark splits


def read_parents(value: str) -> dict[str, list[str]]:
    """The parent table of ``--parents``: ``nus-wide`` (the official NUS-WIDE class relationship, shipped with
    mlgen) or a file of ``parent: child, child`` lines (# comments); any problem is one MlgenError."""
    if value in SHIPPED_PARENTS:
        from importlib import resources

        name = f"{SHIPPED_PARENTS[value]}.txt"
        text = resources.files("mlgen.classifiers").joinpath("splits", name).read_text(encoding="utf-8")
        where = f"the shipped {value} table"
    else:
        path = Path(value)
        if not path.is_file():
            raise MlgenError(f"parents file not found: {path} (or use --parents nus-wide)")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            raise MlgenError(f"{path}: not a readable text file ({type(err).__name__})") from None
        where = str(path)
    table: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parent, sep, children = line.partition(":")
        names = [name.strip() for name in children.split(",") if name.strip()]
        if not sep or not parent.strip() or not names:
            raise MlgenError(f"{where}, line {number}: expected 'parent: child, child', got {line!r}")
        table.setdefault(parent.strip(), []).extend(names)
    return table


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
    """Filtered shard ``i`` holds the kept samples of raw shard ``i``; scores are for every class.

    Decisions are made for the whole run at once (in :meth:`prepare`), because the teacher's
    reliability per label, the gate and the fallback need every image: first every raw shard's
    image embeddings are cached, then each shard writes the samples that were decided kept.
    """

    name = "filtered"
    config_section = "filter"
    requires = ("raw",)

    def __init__(self, run, config: FilterConfig, rescore: bool = False) -> None:
        super().__init__(run, config)
        self.classes = run.classes()
        self.class_index = {label: i for i, label in enumerate(self.classes)}
        self.rescore = rescore  # decide from cached embeddings only; never run the image encoder
        self.cache = EmbeddingCache(run.root, config.clip, run.require("raw")["config_hash"])
        self.aliases = read_aliases(Path(config.label_aliases), self.classes) if config.label_aliases else {}
        self.competitors = self.read_competitors()
        self.parents = read_parents(config.parents) if config.parents else {}
        self.model: Any = None

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        # what the files say, not where they are: an edited file is a changed setting
        settings["label_aliases"] = alias_setting(self.aliases)
        settings["competitors"] = self.competitors or None
        if self.parents:  # the table, not its name: an edited file is a changed setting
            settings["parents"] = self.parents
        return settings

    def read_competitors(self) -> list[str]:
        """Labels scored beside the run's classes but never requested nor kept as labels (e.g. seen labels)."""
        if not self.config.competitors:
            return []
        path = Path(self.config.competitors)
        names = read_labels(path, "competitors file", minimum=1)  # one competitor is enough
        shared = [name for name in names if name in self.class_index]
        if shared:
            raise MlgenError(f"{path}: competitor '{shared[0]}' is one of the run's labels")
        return names

    def plan(self) -> list[dict[str, Any]]:
        raw_plan = json.loads((self.run.stage_dir("raw") / "plan.json").read_text(encoding="utf-8"))
        return [{"shard": s["shard"]} for s in raw_plan["shards"]]

    # --- the whole run's decisions ------------------------------------------------------------

    def prepare(self, ranks: Ranks) -> None:
        """Cache every raw shard's image embeddings (each rank its own shards), then decide every image."""
        self.device = ranks.device
        numbers = [s["shard"] for s in self.plan()]
        self.failed: dict[int, ShardFailed] = {}
        for number in numbers:
            if ranks.owns(number) and not self.rescore and not self.cache.path(number).is_file():
                try:
                    self.embed_shard(number)
                except ShardFailed as err:  # a corrupt raw shard: its filtered shard fails, the others go on
                    self.failed[number] = err
        ranks.wait()
        keys, features, requested = self.cached_run(numbers)
        self.decisions = self.decide(keys, features, requested, write=ranks.is_main)

    def clip(self) -> Any:
        """The CLIP model, loaded on first use (a rescore with cached text features never loads it)."""
        if self.model is None:
            self.model, self.preprocess, self.tokenizer = load_open_clip(self.config.clip, self.device)
        return self.model

    def embed_shard(self, number: int) -> None:
        model, raw = self.clip(), self.run.stage_dir("raw")
        keys, computed = [], []
        for batch, pixels in decoded_batches(raw, number, self.config.batch_size, self.preprocess, self.config.workers):
            keys += [sample["__key__"] for sample in batch]
            with torch.inference_mode():
                features = model.encode_image(pixels.to(self.device, model.logit_scale.dtype))
            computed.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        if computed:  # float16 on disk: a rescore reads exactly what this run decided on
            self.cache.save(number, keys, torch.cat(computed).half().float())
        else:
            self.cache.save(number, [], torch.zeros(0, 1))

    def cached_run(self, numbers: list[int]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Keys, embeddings [N, D] and requested labels [N, C] of every image whose shard was embedded."""
        raw = self.run.stage_dir("raw")
        keys, features, labels = [], [], []
        self.shard_of: dict[str, int] = {}
        for number in numbers:
            cached = self.cache.load(number)
            if cached is None or not cached[0]:
                continue  # failed (corrupt) or empty
            requested = dict(
                zip(*(read_manifest(raw, number).column(c).to_pylist() for c in ("key", "labels")), strict=True)
            )
            if any(key not in requested for key in cached[0]):
                raise MlgenError(f"cached embeddings of raw shard {number} do not match it: filter --overwrite")
            keys += cached[0]
            features.append(cached[1])
            labels += [requested[key] for key in cached[0]]
            self.shard_of.update(dict.fromkeys(cached[0], number))
        unknown = {label for row in labels for label in row} - self.class_index.keys()
        if unknown:
            raise MlgenError(
                f"raw label '{sorted(unknown)[0]}' is not in {self.run.classes_file}; "
                "the raw images were made for other classes"
            )
        mask = requested_mask([[self.class_index[x] for x in row] for row in labels], len(self.classes))
        return keys, (torch.cat(features) if features else torch.zeros(0, 1)), mask

    def decide(
        self, keys: list[str], features: torch.Tensor, requested: torch.Tensor, write: bool
    ) -> dict[str, dict[str, Any]]:
        """Every image's decision, by key; ``write``: also write reliability.json and warn about gated labels."""
        if not keys:
            return {}
        text = TextSide(self, features.to(self.device), requested.to(self.device))
        active = ~text.gated
        logits = torch.cat([text.scores[:, active], text.competitor_scores], dim=1)
        asked = torch.cat([text.requested[:, active], text.requested.new_zeros(len(keys), text.competitor_count)], 1)
        probs = grouping_softmax(logits, asked)
        if self.config.rule == "topk":
            k = rule_topk(self.config.topk, len(self.classes) + text.competitor_count, asked)
            kept, found = topk_keep(probs, asked, k, self.config.extra_threshold)
        else:
            found = detected(probs, asked, self.config.threshold)
            kept = exact_set_keep(probs, asked, self.config.threshold)
        scores = text.teacher_probs()  # gated labels: the teacher's say, never used to decide
        scores[:, active] = probs[:, : int(active.sum())]
        duplicate = self.duplicates(keys, features, kept, text.requested)
        kept &= ~duplicate
        added = fallback(kept, text.requested, scores, self.config.min_keep, ~duplicate)
        decisions = self.decision_rows(keys, text, active, found, kept, added, duplicate, scores)
        if write:
            write_json_atomic(self.folder / RELIABILITY, text.reliability(kept | added, added))
            if text.gated.any():
                names = ", ".join(self.classes[i] for i in text.gated.nonzero().flatten().tolist())
                print(
                    f"warning: filter: not filtering on {names}: the teacher cannot tell their images from the "
                    f"others (AUROC below {self.config.gate}; see {self.folder / RELIABILITY})",
                    file=sys.stderr,
                )
        return decisions

    def duplicates(self, keys: list[str], features: torch.Tensor, kept: torch.Tensor, requested: torch.Tensor):
        """--dedup: a kept image nearly identical (cosine > dedup) to an earlier kept one of its label set and shard."""
        duplicate = torch.zeros_like(kept)
        if self.config.dedup <= 0:
            return duplicate
        seen: dict[tuple[int, tuple[int, ...]], list[torch.Tensor]] = {}
        for row in kept.nonzero().flatten().tolist():
            group = seen.setdefault((self.shard_of[keys[row]], tuple(requested[row].nonzero().flatten().tolist())), [])
            unit = features[row].float()
            if group and float((torch.stack(group) @ unit).max()) > self.config.dedup:
                duplicate[row] = True
            else:
                group.append(unit)
        return duplicate

    def decision_rows(self, keys, text, active, found, kept, added, duplicate, scores) -> dict[str, dict[str, Any]]:
        # the columns decided on: the labels not gated, then the competitors (detected, never kept as labels)
        active_labels = [label for label, on in zip(self.classes, active.tolist(), strict=True) if on]
        active_labels += text.competitor_texts()
        gated = [label for label, off in zip(self.classes, text.gated.tolist(), strict=True) if off]
        rows = {}
        for row, key in enumerate(keys):
            requested = [self.classes[i] for i in text.requested[row].nonzero().flatten().tolist()]
            detected_labels = [active_labels[i] for i in found[row].nonzero().flatten().tolist()]
            training = (
                requested + [x for x in detected_labels if x not in requested and x in self.class_index]
                if self.config.rule == "topk"
                else requested
            )
            training = parents_of(training, self.parents, self.class_index) if self.parents else training
            reasons = [] if kept[row] or added[row] else [rejection_reason(requested, detected_labels)]
            if duplicate[row]:
                reasons = ["duplicate"]
            if added[row]:
                reasons.append("fallback")
            reasons += [f"gated:{label}" for label in requested if label in gated]
            rows[key] = {
                "key": key,
                "labels": requested,
                "training": training,
                "detected": detected_labels,
                "kept": bool(kept[row] or added[row]),
                "reason": ",".join(r for r in reasons if r),
                "scores": [round(float(p), 6) for p in scores[row]],
            }
        return rows

    # --- one shard: write what was decided ---------------------------------------------------

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        number = shard["shard"]
        if number in self.failed:
            raise self.failed[number]
        decisions = []
        with ShardWriter(self.folder, number, FILTERED_SCHEMA) as writer:
            for sample in iter_shard(self.run.stage_dir("raw"), number):
                decision = self.decisions.get(sample["__key__"])
                if decision is None:
                    raise MlgenError(f"cached embeddings of raw shard {number} do not match it: filter --overwrite")
                decisions.append({k: v for k, v in decision.items() if k != "training"})
                if decision["kept"]:
                    self.write_kept(writer, sample, decision)
            kept = writer.commit()
        write_parquet_atomic(self.folder / f"{number:05d}_decisions.parquet", decisions, DECISIONS_SCHEMA)
        return {"images": len(decisions), "kept": kept, "dropped": len(decisions) - kept}

    def write_kept(self, writer: ShardWriter, sample: dict[str, Any], decision: dict[str, Any]) -> None:
        meta = json.loads(sample["json"])
        meta.update(
            requested=meta["labels"],
            labels=decision["training"],
            scores=dict(zip(self.classes, decision["scores"], strict=True)),
            detected=decision["detected"],
            kept=True,
            clip=self.config.clip,
        )
        ext, image = image_of(sample)
        record = {"__key__": sample["__key__"], ext: image, "txt": sample["txt"].decode("utf-8"), "json": meta}
        row = {
            "key": sample["__key__"],
            "prompt_id": meta["prompt_id"],
            "set_id": meta["set_id"],
            "labels": decision["training"],
            "requested": meta["requested"],
            "text": record["txt"],
            "seed": meta["seed"],
            "scores": decision["scores"],
        }
        writer.write(record, row)
