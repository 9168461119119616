"""The stages in order, as library calls (the command line is a thin layer over these)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mlgen.classifiers.stage import ClassifierStage
from mlgen.config import ClassifierConfig, FilterConfig, GenerateConfig, PromptsConfig, build_config
from mlgen.errors import MlgenError
from mlgen.filters.stage import FilterStage
from mlgen.generate.diffusion import check_scheduler, check_text_to_image, image_side
from mlgen.generate.presets import apply_preset
from mlgen.generate.stage import GenerateStage
from mlgen.models.registry import check_clip_weights
from mlgen.paths import write_json_atomic
from mlgen.pipeline.rundir import PLAN, SUCCESS, RunDir, stats_path
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.backends import check_llm
from mlgen.prompts.stage import PromptStage

STAGE_FOLDERS = ("prompts", "raw", "filtered", "classifier")

DEMO_CLASSES = ["dog", "cat", "zebra", "surfboard"]


def make_prompts(
    run: RunDir, config: PromptsConfig, labels: list[str] | None, overwrite: bool = False
) -> dict[str, Any]:
    """Label sets, scene prompts and synonyms for ``labels`` (default: the run's classes.txt)."""
    check_llm(config.llm)
    return run_stage(PromptStage(run, config, labels or run.classes()), overwrite)


def prompt_settings_for_generate(run: RunDir, explicit: dict[str, Any]) -> PromptsConfig:
    """The prompt settings ``generate`` runs the prompt stage with.

    The settings the run's prompts were made with, updated only by the prompt options given
    explicitly (flag, environment, config file): so ``mlgen prompts --llm template`` followed by
    ``mlgen generate`` reuses those prompts instead of comparing them with generate's defaults.
    """
    recorded = run.recorded_config("prompts") if run.success("prompts") is not None else {}
    known = {f.name for f in dataclasses.fields(PromptsConfig)}  # a setting renamed since is left out
    return build_config(PromptsConfig, {k: v for k, v in recorded.items() if k in known}, explicit)


def generate(
    run: RunDir,
    config: GenerateConfig,
    prompts_config: PromptsConfig,
    labels: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render the images (each drawing its label set, or every prompt alike: see GenerateStage); runs the prompt stage
    first when the run has none (or labels are given)."""
    config = apply_preset(config)  # an unknown preset, model, scheduler or a bad size fails now, not after the prompts
    check_text_to_image(config.model)
    check_scheduler(config.scheduler)
    image_side(config.model, config.size)
    if labels is not None or run.success("prompts") is None:
        make_prompts(run, prompts_config, labels)
    return run_stage(GenerateStage(run, config), overwrite)


def check_models(diffusion: list[str], clips: list[str]) -> None:
    """Every model a run will use can be loaded (checked before any stage work, each failure one line)."""
    for name in diffusion:
        check_text_to_image(name)
    for name in clips:
        check_clip_weights(name)


def check_raw_labels(run: RunDir) -> None:
    """Every label in the raw manifests must be one of classes.txt (read from the manifests, no images)."""
    import pyarrow.parquet as pq

    classes, folder = set(run.classes()), run.stage_dir("raw")
    plan = json.loads((folder / PLAN).read_text(encoding="utf-8"))
    for shard in plan["shards"]:
        manifest = folder / f"{shard['shard']:05d}.parquet"
        labels = {
            label for row in pq.read_table(manifest, columns=["labels"]).column("labels").to_pylist() for label in row
        }
        if labels - classes:
            raise MlgenError(
                f"{manifest}: label '{sorted(labels - classes)[0]}' is not in {run.classes_file}; "
                "the raw images were made for other classes"
            )


def filter_images(run: RunDir, config: FilterConfig, overwrite: bool = False, rescore: bool = False) -> dict[str, Any]:
    """Keep the exact-set matches; ``rescore`` redoes the decisions from cached embeddings (no image encoder)."""
    counts = run.require("raw")["counts"]
    if not counts.get("images"):
        failed = f" ({counts['failed']} failed)" if counts.get("failed") else ""
        raise MlgenError(f"the raw stage in {run.stage_dir('raw')} has no images{failed}: nothing to filter")
    check_clip_weights(config.clip)
    check_raw_labels(run)
    stage = FilterStage(run, config, rescore=rescore)
    if rescore:  # checked before the old decisions are discarded
        plan = json.loads((run.stage_dir("raw") / PLAN).read_text(encoding="utf-8"))
        missing = [s["shard"] for s in plan["shards"] if not stage.cache.path(s["shard"]).is_file()]
        if missing:
            raise MlgenError(
                f"--rescore: no cached image embeddings of {config.clip!r} for {len(missing)} raw shard(s) "
                f"(first: {missing[0]}): run `mlgen filter` with this --clip first"
            )
    return run_stage(stage, overwrite or rescore)


def train_classifier(run: RunDir, config: ClassifierConfig, overwrite: bool = False) -> dict[str, Any]:
    run.require(config.source)
    check_clip_weights(config.clip)
    return run_stage(ClassifierStage(run, config), overwrite)


def evaluate(
    run: RunDir,
    data: Path,
    labels: list[str] | None = None,
    ap_rule: str | None = None,
    image_folders: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Score the run's classifier on real labelled images; adds zsl/gzsl/zero_shot_clip to metrics.json.
    ``ap_rule``: sklearn or official (AP 0 for a label without positives); None: official on a benchmark.
    ``image_folders`` (``--images``): where a COCO JSON's images are looked up first."""
    from mlgen.classifiers.evaluate import evaluate_on_data, plot_per_class_ap

    folder = run.stage_dir("classifier")
    metrics = evaluate_on_data(run, data, labels, ap_rule, image_folders)
    stored = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    write_json_atomic(folder / "metrics.json", {**stored, **metrics})
    plot_per_class_ap(metrics, folder / "plots" / "per_class_ap.png")
    return metrics


def evaluate_zero_shot(
    run: RunDir,
    data: Path,
    method: str,
    clip: str,
    labels: list[str] | None = None,
    aliases: dict[str, list[str]] | None = None,
    image_folders: tuple[Path, ...] = (),
):
    """A training-free baseline (clip or s3) on real labelled images: RUN/zero-shot/METHOD/metrics.json;
    ``aliases`` (``--label-aliases``) join each label's names."""
    from mlgen.classifiers.evaluate import zero_shot_on_data

    check_clip_weights(clip)
    metrics = zero_shot_on_data(run, data, method, clip, labels, aliases, image_folders)
    write_json_atomic(run.root / "zero-shot" / method / "metrics.json", metrics)
    return metrics


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
                "stale": stale_inputs(run, folder) if marker else [],
            }
        )
    return rows


def stale_inputs(run: RunDir, folder: Path) -> list[str]:
    """The input stages of a finished stage that were redone since it ran (so its output is out of date).

    Redone means the input's marker hash differs from the one recorded in this stage's plan, or the
    input's marker was written after this stage's own marker (``--overwrite`` with the same settings).
    """
    settings = json.loads((folder / PLAN).read_text(encoding="utf-8"))["settings"]
    finished_at = (folder / SUCCESS).stat().st_mtime
    stale = []
    for key, recorded in settings.items():
        if not key.startswith("upstream "):
            continue
        upstream = key.removeprefix("upstream ")
        marker_file = run.stage_dir(upstream) / SUCCESS
        if not marker_file.is_file():
            stale.append(upstream)
            continue
        current = json.loads(marker_file.read_text(encoding="utf-8"))["config_hash"]
        if current != recorded or marker_file.stat().st_mtime > finished_at:
            stale.append(upstream)
    return stale
