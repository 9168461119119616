"""The stages in order, as library calls (the command line is a thin layer over these)."""

from __future__ import annotations

import json
from typing import Any

from mlgen.classifiers.stage import ClassifierStage
from mlgen.config import ClassifierConfig, FilterConfig, GenerateConfig, PromptsConfig
from mlgen.filters.stage import FilterStage
from mlgen.generate.diffusion import image_side
from mlgen.generate.stage import GenerateStage
from mlgen.models.registry import open_clip_name
from mlgen.pipeline.rundir import PLAN, SUCCESS, RunDir, stats_path
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.llm import check_llm
from mlgen.prompts.stage import PromptStage

STAGE_FOLDERS = ("prompts", "raw", "filtered", "classifier")

DEMO_CLASSES = ["dog", "cat", "zebra", "surfboard"]


def make_prompts(
    run: RunDir, config: PromptsConfig, labels: list[str] | None, overwrite: bool = False
) -> dict[str, Any]:
    """Label sets, scene prompts and synonyms for ``labels`` (default: the run's classes.txt)."""
    check_llm(config.llm)
    return run_stage(PromptStage(run, config, labels or run.classes()), overwrite)


def generate(
    run: RunDir,
    config: GenerateConfig,
    prompts_config: PromptsConfig,
    labels: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render every prompt; runs the prompt stage first when the run has none (or labels are given)."""
    image_side(config.model, config.size)  # an unknown model or a bad size fails now, not after the prompts
    if labels is not None or run.success("prompts") is None:
        make_prompts(run, prompts_config, labels)
    return run_stage(GenerateStage(run, config), overwrite)


def filter_images(run: RunDir, config: FilterConfig, overwrite: bool = False) -> dict[str, Any]:
    run.require("raw")
    open_clip_name(config.clip)
    return run_stage(FilterStage(run, config), overwrite)


def train_classifier(run: RunDir, config: ClassifierConfig, overwrite: bool = False) -> dict[str, Any]:
    run.require("filtered")
    open_clip_name(config.clip)
    return run_stage(ClassifierStage(run, config), overwrite)


def stage_progress(run: RunDir) -> list[dict[str, Any]]:
    """Per stage: shards done / planned (from the stats files) and whether it finished."""
    rows = []
    for name in STAGE_FOLDERS:
        folder = run.stage_dir(name)
        plan_file = folder / PLAN
        if not plan_file.is_file():
            rows.append({"stage": name, "done": 0, "total": 0, "finished": False, "counts": {}})
            continue
        shards = json.loads(plan_file.read_text(encoding="utf-8"))["shards"]
        done = sum(stats_path(folder, s["shard"]).exists() for s in shards)
        marker = json.loads((folder / SUCCESS).read_text()) if (folder / SUCCESS).is_file() else None
        rows.append(
            {
                "stage": name,
                "done": done,
                "total": len(shards),
                "finished": marker is not None,
                "counts": marker["counts"] if marker else {},
            }
        )
    return rows
