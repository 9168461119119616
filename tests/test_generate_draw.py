"""Label sets drawn per image as the official Diff-ZS-MLC loop draws them: two picks, a repeat dropped, one redraw
(single-label about 1/n², not the 1/n of collapsing a repeat), in the quota-free generate path too."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlgen import workflow
from mlgen.config import FilterConfig, GenerateConfig, PromptsConfig
from mlgen.errors import MlgenError
from mlgen.generate.draw import draw_known_set, draw_label_set, draw_shares, image_rng
from mlgen.generate.stage import GenerateStage
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage, settings_hash
from mlgen.prompts.composer import label_pairs
from mlgen.prompts.stage import PromptStage
from mlgen.report import build_report

LABELS = ["circle", "triangle", "star", "heart"]
FAST = dict(model="tiny", steps=2, size=64, shard_size=4, batch_size=4, images_per_prompt=2)


def test_draw_is_single_label_about_one_in_n_squared() -> None:
    labels = [f"l{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    draws = [draw_label_set(rng, labels) for _ in range(20000)]
    sizes = Counter(len(d) for d in draws)
    assert set(sizes) == {1, 2}
    assert sizes[1] / len(draws) == pytest.approx(1 / 64, abs=0.004)  # collapsing a repeat gives 1/8
    # a label is in (2n² - 1) / n³ of the images: 1/n³ alone, 2(n + 1)/n³ with each of the n - 1 others
    assert Counter(label for d in draws for label in d)["l0"] / len(draws) == pytest.approx(127 / 512, abs=0.012)
    assert all(list(d) == sorted(d, key=labels.index) for d in draws)  # in the labels' order
    again = np.random.default_rng(0)
    assert [draw_label_set(again, labels) for _ in range(200)] == draws[:200]  # fixed by the generator
    assert draw_label_set(np.random.default_rng(1), ["only"]) == ("only",)


def test_expected_shares_match_the_draw() -> None:
    sets = label_pairs(LABELS)
    shares = draw_shares(LABELS, sets)
    assert sum(shares) == pytest.approx(1) and sum(
        p for s, p in zip(sets, shares, strict=True) if len(s) == 1
    ) == pytest.approx(1 / 16)
    known = {frozenset(s): i for i, s in enumerate(sets)}
    counts = Counter(draw_known_set(image_rng(7, i), LABELS, known) for i in range(8000))
    for i, share in enumerate(shares):
        assert counts[i] / 8000 == pytest.approx(share, abs=0.012), sets[i]
    # an excluded pair is redrawn: the others share its draws
    kept = label_pairs(LABELS, (("circle", "star"),))
    assert sum(draw_shares(LABELS, kept)) == pytest.approx(1) and len(kept) == len(sets) - 1
    with pytest.raises(MlgenError, match="matched no label set"):
        draw_known_set(image_rng(0, 0), LABELS, {})


def _prompts(root: Path, **config) -> RunDir:
    run = RunDir(root)
    run_stage(PromptStage(run, PromptsConfig(llm="template", **config), LABELS))
    return run


def test_quota_free_images_follow_the_draw(tmp_path: Path) -> None:
    run = _prompts(tmp_path / "pairs")
    prompts = pq.read_table(run.stage_dir("prompts") / "prompts.parquet").to_pylist()
    prompts += [{**p, "prompt_id": p["prompt_id"] + 100} for p in prompts]  # two prompts a set (the template: one)
    config = GenerateConfig(**{**FAST, "images_per_prompt": 20, "seed": 3})
    stage = GenerateStage(run, config)
    stage._prompts = prompts
    assert stage.draws and stage.settings()["label_draw"]
    total = len(prompts) * 20  # the same number of images as rendering every prompt 20 times
    assert stage.plan()[-1]["end"] == total
    samples = stage.samples(0, total)
    sets = {
        s["set_id"]: s["labels"] for s in pq.read_table(run.stage_dir("prompts") / "label_sets.parquet").to_pylist()
    }
    known = {frozenset(labels): set_id for set_id, labels in sets.items()}
    for i, sample in enumerate(samples):  # the set drawn from (seed, index), then one of ITS prompts
        assert (
            sample["set_id"] == draw_known_set(image_rng(3, i), LABELS, known)
            and sample["labels"] == sets[sample["set_id"]]
        )
    assert Counter(len(s["labels"]) for s in samples)[1] / total == pytest.approx(1 / 16, abs=0.03)  # not 4/10
    assert len({s["seed"] for s in samples}) == total  # a repeated prompt still gets new noise
    assert stage.samples(50, 60) == samples[50:60]  # any slice: never from the batch or shard position
    assert len({s["prompt_id"] for s in samples if s["set_id"] == 0}) == 2  # either prompt of a set


@pytest.mark.parametrize("config", [{"set_size": 2, "sets_per_label": 2}, {"label_sets": (("circle",), ("star",))}])
def test_sets_the_user_chose_render_every_prompt(tmp_path: Path, config: dict) -> None:
    run = _prompts(tmp_path / "chosen", **config)
    prompts = pq.read_table(run.stage_dir("prompts") / "prompts.parquet").to_pylist()
    stage = GenerateStage(run, GenerateConfig(**FAST))
    assert not stage.draws and "label_draw" not in stage.settings()
    samples = stage.samples(0, len(prompts) * 2)
    assert [s["prompt_id"] for s in samples] == [p["prompt_id"] for p in prompts for _ in range(2)]


def test_marker_counts_single_label_images_and_an_old_plan_is_refused(tmp_path: Path) -> None:
    run = _prompts(tmp_path / "run")
    marker = run_stage(GenerateStage(run, GenerateConfig(**FAST)))
    raw = run.stage_dir("raw")
    rows = [r for p in sorted(raw.glob("0*.parquet")) for r in pq.read_table(p).to_pylist()]
    single = sum(len(r["labels"]) == 1 for r in rows)
    assert marker["counts"]["images"] == len(rows) == 20
    assert marker["counts"]["single_label"] == single
    assert marker["counts"]["single_label_share"] == round(single / 20, 4)
    workflow.filter_images(run, FilterConfig(clip="tiny"))
    page = build_report(run).read_text(encoding="utf-8")
    assert f"<p>20 images generated; {single} single-label ({single / 20:.1%})" in page

    # a run planned before the draw (per prompt, no label_draw in its settings) with a shard done: refused
    plan = json.loads((raw / "plan.json").read_text())
    del plan["settings"]["label_draw"]
    plan["config_hash"] = settings_hash(plan["settings"])
    (raw / "plan.json").write_text(json.dumps(plan))
    (raw / "_SUCCESS.json").unlink()
    (raw / "00001_stats.json").unlink()
    with pytest.raises(MlgenError, match="setting 'label_draw' changed from None"):
        run_stage(GenerateStage(run, GenerateConfig(**FAST)))
