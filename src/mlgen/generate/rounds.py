"""Per-class quota rounds (Diff-ZS-MLC): generate and filter in rounds until every label has N kept images.

Round ``r`` is a small run directory ``RUN/rounds/RR/`` (its ``prompts`` a link to the run's) holding
an ordinary ``raw`` and ``filtered`` stage, so each round is its own resumable set of shards and a
kill in round 3 never redoes rounds 1-2. A round renders only label sets whose labels are all still
under the quota, each image drawing one of its set's prompts at random from its own seed. Once the
quota is met (or the rounds run out) a ``filtered`` stage in the run links every round's kept shards
together, so the classifier reads them like any filtered stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mlgen.classifiers.source import SURPLUS_FILE
from mlgen.config import FilterConfig, GenerateConfig
from mlgen.errors import MlgenError
from mlgen.filters.stage import FilterStage
from mlgen.generate.diffusion import sample_seed
from mlgen.generate.draw import draw_label_set
from mlgen.generate.stage import GenerateStage
from mlgen.paths import temp_sibling, write_json_atomic
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage, run_stage
from mlgen.shards.reader import finished_shards, read_manifest
from mlgen.shards.writer import shard_paths

QUOTA_FILE = "quota.json"


def round_run(run: RunDir, number: int) -> RunDir:
    """The round's own run directory, sharing the run's prompts and classes."""
    sub = RunDir(run.root / "rounds" / f"{number:02d}")
    sub.root.mkdir(parents=True, exist_ok=True)
    if not (sub.root / "prompts").exists():
        os.symlink(os.path.relpath(run.stage_dir("prompts"), sub.root), sub.root / "prompts")
    sub.write_classes(run.classes())
    return sub


def finished_rounds(run: RunDir) -> list[RunDir]:
    rounds = sorted((run.root / "rounds").glob("[0-9][0-9]")) if (run.root / "rounds").is_dir() else []
    return [RunDir(r) for r in rounds if RunDir(r).success("filtered") is not None]


def kept_per_label(run: RunDir) -> Counter:
    """Kept images per label over every finished round."""
    kept: Counter = Counter()
    for sub in finished_rounds(run):
        folder = sub.stage_dir("filtered")
        for shard in finished_shards(folder):
            for labels in read_manifest(folder, shard).column("labels").to_pylist():
                kept.update(labels)
    return kept


class RoundGenerateStage(GenerateStage):
    """One round's images: ``per_set[set_id]`` images of each listed label set, a random prompt each."""

    def __init__(self, run: RunDir, config: GenerateConfig, number: int, per_set: dict[int, int]) -> None:
        super().__init__(run, config)
        self.number, self.per_set = number, per_set
        self.order = [(set_id, j) for set_id, count in sorted(per_set.items()) for j in range(count)]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "round": self.number, "per_set": {str(k): v for k, v in self.per_set.items()}}

    def plan(self) -> list[dict[str, Any]]:
        size = self.config.shard_size
        return [
            {"shard": n, "start": start, "end": min(start + size, len(self.order))}
            for n, start in enumerate(range(0, len(self.order), size))
        ]

    def samples(self, start: int, end: int) -> list[dict[str, Any]]:
        by_set: dict[int, list[dict[str, Any]]] = {}
        for prompt in self.prompts:
            by_set.setdefault(prompt["set_id"], []).append(prompt)
        out = []
        for set_id, j in self.order[start:end]:
            seed = sample_seed(self.config.seed + 1_000_003 * self.number, set_id, j)
            choices = by_set[set_id]
            out.append({**choices[seed % len(choices)], "image_index": j, "seed": seed})  # the prompt drawn by seed
        return out


def draw_sets(rng: np.random.Generator, pool: list[str], known: dict[frozenset, int], need: dict[str, int]) -> Counter:
    """Images per label set, drawn one image at a time from the labels still needing images (a label leaves
    the draw once it has its count, as the official loop); a draw that is no label set (an excluded pair) is
    redrawn."""
    per_set: Counter = Counter()
    misses = 0
    while pool and misses < 1000:
        labels = draw_label_set(rng, pool)
        set_id = known.get(frozenset(labels))
        if set_id is None:
            misses += 1
            continue
        per_set[set_id] += 1
        for label in labels:
            need[label] -= 1
        pool = [label for label in pool if need[label] > 0]
    return per_set


def round_plan(
    run: RunDir, classes: list[str], quota: int, kept: Counter, seed: int = 0, number: int = 1
) -> dict[int, int]:
    """Images per label set for the next round: the official two-label draw over the labels still short,
    until each has drawn its deficit (the filter's losses are made up by the next round). Label sets that
    are not pairs (``--set-size``) fall back to sharing each deficit over the open sets."""
    sets = pq.read_table(run.stage_dir("prompts") / "label_sets.parquet").to_pylist()
    short = [label for label in classes if kept[label] < quota]
    known = {frozenset(s["labels"]): s["set_id"] for s in sets}
    rng = np.random.default_rng([seed, number])
    need = {label: quota - kept[label] for label in short}
    drawn = draw_sets(rng, short, known, need)
    left = [label for label in short if need[label] > 0]  # its sets are (almost) never drawn: few, not pairs
    if drawn and left:  # each such label's deficit shared over the sets that have it, so no round misses it
        with_left = [s for s in sets if set(s["labels"]) & set(left)]
        sets_with = Counter(label for s in with_left for label in set(s["labels"]))
        for s in with_left:
            drawn[s["set_id"]] += max(math.ceil(need[x] / sets_with[x]) for x in set(s["labels"]) if x in left)
    if drawn or not short:
        return dict(sorted(drawn.items()))
    open_sets = [s for s in sets if set(s["labels"]) <= set(short)]
    sets_with = Counter(label for s in open_sets for label in set(s["labels"]))
    return {
        s["set_id"]: max(math.ceil((quota - kept[label]) / sets_with[label]) for label in set(s["labels"]))
        for s in open_sets
    }


@dataclass(frozen=True)
class RoundsConfig:
    quota: int
    max_rounds: int


class MergeRoundsStage(Stage):
    """``RUN/filtered``: every round's kept shards, hard-linked (no copy) under one plan."""

    name = "filtered"
    config_section = "rounds"

    def __init__(self, run: RunDir, config: RoundsConfig, rounds: list[RunDir]) -> None:
        super().__init__(run, config)
        self.rounds = rounds

    def settings(self) -> dict[str, Any]:
        return {"rounds": {r.root.name: r.require("filtered")["config_hash"] for r in self.rounds}}

    def plan(self) -> list[dict[str, Any]]:
        shards = [(r.root.name, s) for r in self.rounds for s in finished_shards(r.stage_dir("filtered"))]
        return [{"shard": n, "round": name, "source": s} for n, (name, s) in enumerate(shards)]

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        source = self.run.root / "rounds" / shard["round"] / "filtered"
        for src, dst in zip(
            shard_paths(source, shard["source"]), shard_paths(self.folder, shard["shard"]), strict=True
        ):
            tmp = temp_sibling(dst)
            os.link(src, tmp)
            os.replace(tmp, dst)
        return {"kept": read_manifest(self.folder, shard["shard"]).num_rows}

    def finish(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        """Cap every label at the quota: in merge order an image is trained on only while all its labels are
        under the quota; the rest stay on disk, listed in ``quota_surplus.json`` (the classifier skips them)."""
        counts: Counter = Counter()
        surplus = []
        for shard in finished_shards(self.folder):
            manifest = read_manifest(self.folder, shard)
            for key, labels in zip(
                manifest.column("key").to_pylist(), manifest.column("labels").to_pylist(), strict=True
            ):
                if all(counts[label] < self.config.quota for label in labels):
                    counts.update(labels)
                else:
                    surplus.append([shard, key])
        write_json_atomic(self.folder / SURPLUS_FILE, {"quota": self.config.quota, "samples": surplus})
        totals = super().finish(stats)
        return {**totals, "surplus": len(surplus), "trained": totals.get("kept", 0) - len(surplus)}


def run_rounds(
    run: RunDir, config: GenerateConfig, filter_config: FilterConfig, quota: int, max_rounds: int
) -> dict[str, Any]:
    """Generate and filter rounds until every label has ``quota`` kept images; MlgenError if rounds run out."""
    classes = run.classes()
    write_json_atomic(run.root / "rounds" / QUOTA_FILE, {"quota": quota, "max_rounds": max_rounds})
    if config.text_encoder is None and (run.root / "text_encoder").is_dir():  # the run's, not the round's
        config = dataclasses.replace(config, text_encoder=str(run.root / "text_encoder"))
    for number in range(1, max_rounds + 1):
        sub = RunDir(run.root / "rounds" / f"{number:02d}")
        if sub.success("filtered") is not None:
            continue  # a finished round is never redone
        per_set = round_plan(run, classes, quota, kept_per_label(run), config.seed, number)
        if not per_set:
            break
        sub = round_run(run, number)
        run_stage(RoundGenerateStage(sub, config, number, per_set))
        run_stage(FilterStage(sub, filter_config))
    rounds = finished_rounds(run)
    marker = run_stage(MergeRoundsStage(run, RoundsConfig(quota, max_rounds), rounds), overwrite=True)
    kept = kept_per_label(run)
    short = [f"{label} ({kept[label]}/{quota})" for label in classes if kept[label] < quota]
    if short:
        raise MlgenError(
            f"quota {quota} not reached in {max_rounds} rounds; short: {', '.join(short)} "
            "(raise --max-rounds, or check the filter keeps images of these labels)"
        )
    return marker


def quota_status(run: RunDir) -> list[str]:
    """Lines for ``mlgen status``: kept images per label against the quota."""
    path = run.root / "rounds" / QUOTA_FILE
    if not path.is_file():
        return []
    quota = json.loads(path.read_text(encoding="utf-8"))["quota"]
    kept = kept_per_label(run)
    rounds = len(finished_rounds(run))
    return [f"quota {quota} per label after {rounds} round(s):"] + [
        f"  {label:<20} {kept[label]:>6}/{quota}{'' if kept[label] >= quota else '  short'}" for label in run.classes()
    ]
