"""``mlgen demo``: every stage offline, in a few minutes on a CPU.

By default on the toy world (see :mod:`mlgen.world`): the unseen labels are four of its shapes,
the images come from the trained ``toy`` text-to-image model, the toy CLIP filters them, and the
classifier is scored on rendered REAL scenes it never saw, beside the toy CLIP's zero-shot scores
and beside the same classifier trained on the unfiltered images. ``--model tiny`` runs the
random-weight smoke test instead (its numbers mean nothing).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mlgen import workflow
from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.features import image_features, label_embeddings
from mlgen.classifiers.metrics import evaluate_scores
from mlgen.classifiers.model import load_trained
from mlgen.classifiers.predict import predict_logits
from mlgen.classifiers.stage import ClassifierStage
from mlgen.config import ClassifierConfig, FilterConfig, FinetuneConfig, GenerateConfig, PromptsConfig
from mlgen.errors import MlgenError
from mlgen.labels import parse_labels
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_json_atomic
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage

TOY = "toy"
# The demo's unseen labels: four of the toy world's eight shapes.
TOY_DEMO_CLASSES = ["circle", "triangle", "star", "heart"]
REAL_TEST_IMAGES = 300
REAL_TEST_SEED = 7
# Text-encoder fine-tuning in the toy world: the paper's lr 7e-8 moves SD's 123M-parameter encoder over
# thousands of steps; the toy encoder (0.1M parameters) is trained for tens of steps at a larger rate.
TOY_FINETUNE_LR = 1e-4


class UnfilteredClassifierStage(ClassifierStage):
    """The same classifier trained on every generated image (``source: raw``), in its own folder."""

    name = "classifier-unfiltered"


class FusionClassifierStage(ClassifierStage):
    """The same classifier with the feature fusion modules trained inside the frozen encoder."""

    name = "classifier-fusion"


def real_test_metrics(run: RunDir, data: Path, clip: str, heads: dict[str, str]) -> dict[str, dict[str, float]]:
    """Scores on the rendered real test set (``data/labels.csv``): ``clip`` zero-shot and each trained head."""
    import csv

    with (data / "labels.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    classes = run.classes()
    targets = torch.tensor([[c in row["labels"].split("|") for c in classes] for row in rows]).float().numpy()
    images = [(data / row["image"]).read_bytes() for row in rows]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer = load_open_clip(clip, device)
    features = image_features(model, squash_transform(preprocess), images, device)
    zero_shot = features @ label_embeddings(model, tokenizer, classes, device).T
    metrics = {"zero_shot_clip": evaluate_scores(zero_shot.numpy(), targets)}
    for name, stage in heads.items():
        classifier, head_preprocess, config = load_trained(run.stage_dir(stage), device)
        if config["classes"] != classes:
            raise MlgenError(f"the {stage} classifier's labels differ from the run's: train it again")
        logits = predict_logits(classifier, squash_transform(head_preprocess), images)  # logits: no float32 ties
        metrics[name] = evaluate_scores(logits, targets)
    return metrics


def toy_experiment(
    run: RunDir, llm: str = "smollm2", model: str = TOY, seed: int = 0, finetune_steps: int = 0, fusion: bool = False
) -> dict[str, Any]:
    """The toy-world pipeline in ``run``; returns the raw / filtered stage markers and the real-test metrics.

    ``finetune_steps``: fine-tune the toy text encoder with the CLIP-score loss first (generation then uses
    it); ``fusion``: also train the classifier with feature fusion (metrics key ``fusion``).
    """
    from mlgen.world.render import render_dataset

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny models on a shared CPU: extra threads mostly wait on each other
    classes = parse_labels("\n".join(TOY_DEMO_CLASSES), "demo classes")
    # Sized for a 2-core CPU: the LLM writes 20 short prompts, the toy model draws 6 images of each.
    # No negative prompt: the paper's ("watermark, text, ...") is for SD's artefacts; the toy text encoder
    # knows none of its words, and with it the toy CLIP keeps 0.13 of the images instead of 0.72.
    prompt_settings = PromptsConfig(
        llm=llm,
        prompts_per_set=2,
        synonyms_per_label=2,
        max_new_tokens=40,
        sets_per_shard=10,
        seed=seed,
        negative_prompt="",
    )
    raw_settings = GenerateConfig(
        model=model, images_per_prompt=6, shard_size=60, steps=10, image_format="png", seed=seed
    )
    if finetune_steps:
        from mlgen.finetune.stage import finetune

        workflow.make_prompts(run, prompt_settings, classes)
        tuning = FinetuneConfig(
            model=model,
            clip=TOY,
            size=64,
            steps=raw_settings.steps,
            learning_rate=TOY_FINETUNE_LR,
            max_train_steps=finetune_steps,
            grad_steps=2,
            seed=seed,
        )
        finetune(run, tuning)  # writes RUN/text_encoder/, which generate picks up
    raw = workflow.generate(run, raw_settings, prompt_settings, classes)
    filtered = workflow.filter_images(run, FilterConfig(clip=TOY))
    # A head on the toy CLIP's frozen image features, started from random weights (not from its text
    # embeddings, whose zero-shot scores are already perfect): what it knows it learns from the images.
    classifier = ClassifierConfig(clip=TOY, head_init="random", epochs=50, seed=seed)
    heads = {"filtered": "classifier", "unfiltered": "classifier-unfiltered"}
    try:
        workflow.train_classifier(run, classifier)
    except MlgenError as err:  # the filter kept too few images (a weak toy model): say so, score the rest
        heads.pop("filtered")
        filtered = {**filtered, "classifier_error": str(err)}
    run_stage(UnfilteredClassifierStage(run, replace(classifier, source="raw")))
    if fusion and "filtered" in heads:
        run_stage(FusionClassifierStage(run, replace(classifier, fusion=True)))
        heads["fusion"] = "classifier-fusion"
    real = run.root / "real-test"
    if not (real / "labels.csv").is_file():
        render_dataset(real, REAL_TEST_IMAGES, REAL_TEST_SEED, classes)
    metrics = real_test_metrics(run, real, TOY, heads)
    write_json_atomic(run.root / "real-test-metrics.json", metrics)
    return {"raw": raw, "filtered": filtered, "metrics": metrics, "classes": classes}


def run_demo(run: RunDir, llm: str = "smollm2", model: str = TOY) -> list[str]:
    """Run prompts -> generate -> filter -> classifier -> real test; return summary lines."""
    if model == "tiny":
        return run_tiny_demo(run, llm)
    result = toy_experiment(run, llm, model)
    metrics = result["metrics"]
    return [
        *_stage_lines(run, result["raw"], result["filtered"]),
        f"real test: {REAL_TEST_IMAGES} rendered scenes of {', '.join(result['classes'])} (never seen in training)",
        *(
            f"  {title:<46} mAP {metrics[key]['mAP']:.3f}  F1@3 {metrics[key]['f1@3']:.3f}"
            if key in metrics
            else f"  {title:<46} not trained: {result['filtered']['classifier_error']}"
            for key, title in (
                ("filtered", "classifier on CLIP-filtered toy images"),
                ("unfiltered", "same classifier on all toy images (no filter)"),
                ("zero_shot_clip", "toy CLIP zero-shot (the filter: a ceiling)"),
            )
        ),
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
