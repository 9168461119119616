"""Per-class quota rounds: each round its own resumable shards, merged for the classifier; a quota
that cannot be reached ends the run naming the labels short."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import mlgen
from mlgen.config import FilterConfig, GenerateConfig, PromptsConfig
from mlgen.errors import MlgenError
from mlgen.generate.rounds import kept_per_label, run_rounds
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.stage import PromptStage

GEN = GenerateConfig(model="tiny", steps=2, size=64, shard_size=8, batch_size=4)


@pytest.mark.slow
def test_rounds_resume_merge_and_report_short_labels(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run_stage(PromptStage(run, PromptsConfig(llm="template", prompts_per_set=3), ["zebra", "kite"]))
    with pytest.raises(MlgenError, match=r"quota 4 not reached in 1 rounds; short: .*zebra \(\d/4\)"):
        run_rounds(run, GEN, FilterConfig(clip="tiny", gate=0.0, min_keep=0.0), quota=4, max_rounds=1)
    first = run.root / "rounds" / "01"
    raw_plan = json.loads((first / "raw" / "plan.json").read_text())
    assert raw_plan["settings"]["round"] == 1 and raw_plan["settings"]["per_set"]
    samples = [r for p in sorted((first / "raw").glob("0*.parquet")) for r in pq.read_table(p).to_pylist()]
    prompts = pq.read_table(run.stage_dir("prompts") / "prompts.parquet").to_pylist()
    by_set: dict[int, list[int]] = {}
    for prompt in prompts:
        by_set.setdefault(prompt["set_id"], []).append(prompt["prompt_id"])
    for s in samples:  # one of its own set's prompts, drawn by the image's seed
        assert s["prompt_id"] == by_set[s["set_id"]][s["seed"] % len(by_set[s["set_id"]])]
    assert len({s["seed"] for s in samples}) == len(samples)
    stamps = {p.name: p.stat().st_mtime_ns for p in (first / "raw").iterdir()}

    kept_before = kept_per_label(run)
    error = None
    try:
        run_rounds(run, GEN, FilterConfig(clip="tiny", gate=0.0, min_keep=0.0), quota=4, max_rounds=2)
    except MlgenError as err:
        error = str(err)
    short = sorted(label for label in ("zebra", "kite") if kept_per_label(run)[label] < 4)
    assert (error is None) == (not short), (error, short)  # it fails exactly when a label is still short
    assert error is None or (all(label in error for label in short) and "in 2 rounds" in error)
    assert {p.name: p.stat().st_mtime_ns for p in (first / "raw").iterdir()} == stamps  # round 1 not redone
    second = json.loads((run.root / "rounds" / "02" / "raw" / "plan.json").read_text())["settings"]["per_set"]
    sets = pq.read_table(run.stage_dir("prompts") / "label_sets.parquet").to_pylist()
    assert second  # labels still short are drawn again
    for set_id in second:  # round 2 renders only sets whose labels were all still short
        assert all(kept_before[label] < 4 for label in sets[int(set_id)]["labels"])
    merged = run.stage_dir("filtered")
    merged_labels = [
        label for p in sorted(merged.glob("0*.parquet")) for labels in pq.read_table(p).column("labels").to_pylist()
        for label in labels
    ]  # fmt: skip
    assert sorted(merged_labels) == sorted(kept_per_label(run).elements())
    status = mlgen("status", "--run", run.root)
    assert status.returncode == 0 and "quota 4 per label" in status.stdout and "zebra" in status.stdout
