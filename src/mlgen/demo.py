"""``mlgen demo``: every stage offline, in a few minutes on a CPU.

By default a thin caller of :mod:`mlgen.experiment` on the toy world for one seed and three arms: the teacher
CLIP's zero-shot scores, ``mlgen`` (LLM prompts -> toy images -> CLIP filter -> classifier, with real images
of the seen shapes) and the ``oracle`` (the same classifier on real images of the unseen shapes), on rendered
REAL test scenes of all eight shapes, ZSL and GZSL, with the gap closed. ``--model tiny`` runs the
random-weight smoke test instead (its numbers mean nothing).
"""

from __future__ import annotations

import json
from typing import Any

from mlgen import workflow
from mlgen.config import ClassifierConfig, ExperimentConfig, FilterConfig, GenerateConfig, PromptsConfig
from mlgen.labels import parse_labels
from mlgen.pipeline.rundir import RunDir

TOY = "toy"
# The demo's unseen labels: four of the toy world's eight shapes (the other four are seen).
TOY_DEMO_CLASSES = ["circle", "triangle", "star", "heart"]
DEMO_ARMS = "zero-shot,mlgen,oracle"
# The demo's classifier is the experiment's shared head (a linear head on the frozen teacher started from its text
# embeddings of the label names, then trained on the images; see mlgen.experiment.runner).


def demo_world() -> str:
    """``toy`` (the headroom world) once its models are shipped, else ``toy-classic``."""
    from mlgen.models.builtin import builtin

    model = builtin("toy-headroom", "clip")
    return "toy" if model is not None and model.marker.is_file() else "toy-classic"


def demo_settings(llm: str = "smollm2", world: str | None = None) -> ExperimentConfig:
    """One seed, three arms, sized for a 2-core CPU (about 2 minutes)."""
    return ExperimentConfig(
        world=world or demo_world(),
        unseen=",".join(TOY_DEMO_CLASSES),
        seeds=1,
        arms=DEMO_ARMS,
        llm=llm,
        prompts_per_set=2,
        images_per_prompt=6,
        test_images=400,
        seen_images=256,
        oracle_images=512,
    )


def headline(summary: dict[str, Any]) -> list[str]:
    """Teacher zero-shot, mlgen, oracle and the gap closed, ZSL and GZSL."""
    lines = []
    for setting in ("zsl", "gzsl"):
        block = summary[setting]
        figures = "  ".join(
            f"{arm} {block[arm]['mAP']['mean']:.3f}" if block[arm]["mAP"]["mean"] is not None else f"{arm} FAILED"
            for arm in ("zero-shot", "mlgen", "oracle")
        )
        gap = block["gap_closed"]
        closed = f"{gap['value']:.2f}" if gap and gap["value"] is not None else "n/a (oracle not above zero-shot)"
        lines.append(f"{setting.upper():<4} mAP  {figures}  gap closed {closed}")
    return lines


def run_demo(run: RunDir, llm: str = "smollm2", model: str = TOY) -> list[str]:
    """The experiment's headline for one seed on the toy world (``model`` tiny: the smoke test)."""
    from mlgen.experiment import run_experiment

    if model == "tiny":
        return run_tiny_demo(run, llm)
    settings = demo_settings(llm)
    summary = run_experiment(run.root, settings, log=lambda line: print(line, flush=True))
    folder = run.root / "experiment"
    mlgen_run = RunDir(folder / "runs" / "0" / "mlgen")
    return [
        *_stage_lines(mlgen_run, mlgen_run.require("raw"), mlgen_run.require("filtered")),
        f"real test: {settings.test_images} rendered scenes of all 8 shapes ({settings.world} world), unseen: "
        f"{', '.join(TOY_DEMO_CLASSES)}; seed 0, every classifier {settings.epochs} epochs of "
        f"{settings.pass_steps} real + {settings.pass_steps} synthetic steps, best epoch on validation scenes",
        *headline(summary),
        f"table: {folder / 'table.md'}  (mlgen experiment --seeds 10 --arms ALL for every arm with intervals)",
    ]


def _stage_lines(run: RunDir, raw: dict[str, Any], filtered: dict[str, Any]) -> list[str]:
    prompts = run.success("prompts")["counts"]
    return [
        f"prompts/   {prompts['prompts']} prompts for {prompts['label_sets']} label sets "
        f"({prompts['prompts_from_llm']} written by the LLM), {prompts['synonyms']} synonyms",
        f"raw/       {raw['counts']['images']} images in {raw['shards']} WebDataset shards (+ Parquet manifests)",
        f"filtered/  {filtered['counts']['kept']} kept, {filtered['counts']['dropped']} dropped by the CLIP filter",
    ]


def run_tiny_demo(run: RunDir, llm: str) -> list[str]:
    """The random-weight smoke test: every stage on the built-in tiny models."""
    classes = parse_labels("\n".join(workflow.DEMO_CLASSES), "demo classes")
    prompt_settings = PromptsConfig(llm=llm, prompts_per_set=3, synonyms_per_label=3, sets_per_shard=5)
    raw_settings = GenerateConfig(model="tiny", images_per_prompt=4, shard_size=32, steps=20)
    raw = workflow.generate(run, raw_settings, prompt_settings, classes)
    filtered = workflow.filter_images(run, FilterConfig(clip="tiny"))
    workflow.train_classifier(run, ClassifierConfig(clip="tiny", epochs=30, holdout=0.2))  # a synthetic score
    metrics = json.loads((run.root / "classifier" / "metrics.json").read_text())["synthetic_heldout"]
    return [
        *_stage_lines(run, raw, filtered),
        f"classifier/ held-out mAP {metrics['mAP']:.3f}, P@3 {metrics['precision@3']:.3f}, "
        f"R@3 {metrics['recall@3']:.3f}, F1@3 {metrics['f1@3']:.3f} on {metrics['images']} images",
        "(tiny models have random weights: the numbers exercise the pipeline, they mean nothing)",
    ]
