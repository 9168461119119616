"""The prompt stage: label sets, LLM scene prompts and synonyms, written as Parquet tables."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mlgen.config import PromptsConfig
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage
from mlgen.prompts.composer import label_pairs
from mlgen.prompts.llm import PromptWriter, make_writer
from mlgen.shards.writer import write_parquet_atomic

PART_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "prompt" or "synonym"
        ("set_id", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("text", pa.string()),
        ("source", pa.string()),
    ]
)
LABEL_SETS_SCHEMA = pa.schema([("set_id", pa.int64()), ("labels", pa.list_(pa.string()))])
PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("set_id", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("text", pa.string()),
        ("negative_text", pa.string()),
        ("source", pa.string()),
    ]
)
SYNONYMS_SCHEMA = pa.schema([("label", pa.string()), ("synonym", pa.string()), ("source", pa.string())])


class PromptStage(Stage):
    """Shards of label sets (scene prompts) and of labels (synonyms); merged into three tables."""

    name = "prompts"
    config_section = "prompts"

    def __init__(self, run: RunDir, config: PromptsConfig, classes: list[str]) -> None:
        super().__init__(run, config)
        self.classes = classes
        self.label_sets = label_pairs(classes, config.exclude_pairs)
        self.writer: PromptWriter | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "classes": self.classes}

    def plan(self) -> list[dict[str, Any]]:
        self.run.write_classes(self.classes)  # only reached when the settings check passed
        size = self.config.sets_per_shard
        shards = [
            {"kind": "prompt", "start": start, "end": min(start + size, len(self.label_sets))}
            for start in range(0, len(self.label_sets), size)
        ]
        shards += [
            {"kind": "synonym", "start": start, "end": min(start + size, len(self.classes))}
            for start in range(0, len(self.classes), size)
        ]
        return [{"shard": number, **shard} for number, shard in enumerate(shards)]

    def setup(self, ranks: Ranks) -> None:
        self.writer = make_writer(self.config, ranks.device)

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        assert self.writer is not None
        start, end, seed = shard["start"], shard["end"], self.config.seed + 1000 * shard["shard"]
        rows: list[dict[str, Any]] = []
        if shard["kind"] == "prompt":
            sets = self.label_sets[start:end]
            answers = self.writer.scene_prompts(sets, self.config.prompts_per_set, seed)
            for set_id, label_set, prompts in zip(range(start, end), sets, answers, strict=True):
                rows += [
                    dict(kind="prompt", set_id=set_id, labels=list(label_set), text=p.text, source=p.source)
                    for p in prompts
                ]
        else:
            labels = self.classes[start:end]
            for label, synonyms in zip(
                labels, self.writer.synonyms(labels, self.config.synonyms_per_label, seed, self.classes), strict=True
            ):
                rows.append(dict(kind="synonym", set_id=None, labels=[label], text=label, source="label"))
                rows += [
                    dict(kind="synonym", set_id=None, labels=[label], text=s, source=f"llm:{self.writer.name}")
                    for s in synonyms
                ]
        write_parquet_atomic(self.folder / "parts" / f"{shard['shard']:05d}.parquet", rows, PART_SCHEMA)
        from_llm = sum(row["source"].startswith("llm:") for row in rows)
        return {"kind": shard["kind"], "rows": len(rows), "from_llm": from_llm}

    def finish(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        parts = pa.concat_tables(
            pq.read_table(self.folder / "parts" / f"{s['shard']:05d}.parquet", schema=PART_SCHEMA) for s in stats
        ).to_pylist()
        prompts = [row for row in parts if row["kind"] == "prompt"]
        prompt_rows = [
            dict(
                prompt_id=i,
                set_id=r["set_id"],
                labels=r["labels"],
                text=r["text"],
                negative_text=self.config.negative_prompt,
                source=r["source"],
            )
            for i, r in enumerate(prompts)
        ]
        synonym_rows = [
            dict(label=r["labels"][0], synonym=r["text"], source=r["source"]) for r in parts if r["kind"] == "synonym"
        ]
        set_rows = [dict(set_id=i, labels=list(s)) for i, s in enumerate(self.label_sets)]
        write_parquet_atomic(self.folder / "label_sets.parquet", set_rows, LABEL_SETS_SCHEMA)
        write_parquet_atomic(self.folder / "prompts.parquet", prompt_rows, PROMPTS_SCHEMA)
        write_parquet_atomic(self.folder / "synonyms.parquet", synonym_rows, SYNONYMS_SCHEMA)
        return {
            "label_sets": len(set_rows),
            "prompts": len(prompt_rows),
            "prompts_from_llm": sum(r["source"].startswith("llm:") for r in prompt_rows),
            "synonyms": len(synonym_rows),
        }
