"""One (seed, arm) cell: train what the arm says (or nothing) and score it on the real test set.

Trained arms go through the classifier stage (``ClassifierStage`` under the arm's own folder) with one
``ClassifierConfig``: the same head, optimizer, augmentation and ``steps`` optimizer steps for all of them; they
differ only in their data (``source``, the run) and, for ``+fusion``, the fusion modules. ``text-only`` cannot
read images, so it runs the same schedule through :func:`mlgen.classifiers.train.fit` itself: the seen real
images pass (cached augmented views, seen columns) then the prompts' text embeddings (unseen columns).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.evaluate import load_eval_set, subsets, zero_shot_scores
from mlgen.classifiers.metrics import evaluate_scores
from mlgen.classifiers.predict import predict_logits
from mlgen.classifiers.stage import ClassifierStage
from mlgen.config import ClassifierConfig, ExperimentConfig
from mlgen.errors import MlgenError
from mlgen.experiment.arms import Arm, stage_name
from mlgen.experiment.data import Setup, seen_set
from mlgen.experiment.runs import SeedSeeds, prepare, shared_prompts
from mlgen.pipeline.runner import run_stage


@dataclass
class TestSet:
    """The real test images and their targets over the evaluation labels (unseen first)."""

    images: list[bytes]
    targets: np.ndarray
    classes: list[str]
    unseen: int  # the first ``unseen`` columns are the unseen labels

    @classmethod
    def load(cls, data: Path, setup: Setup) -> TestSet:
        images, targets, _ = load_eval_set(data, setup.classes)
        return cls(images, targets, setup.classes, len(setup.unseen))

    def score(self, scores: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
        """ZSL (unseen labels, images with one) and GZSL (all labels, images with one) mAP and F1@3."""
        missing = [c for c in self.classes if c not in names]
        if missing:
            raise MlgenError(f"the classifier cannot score label '{missing[0]}'")
        scores = scores[:, [names.index(c) for c in self.classes]]
        rows = subsets(self.targets, list(range(self.unseen)))
        zsl = evaluate_scores(scores[rows["zsl"]][:, : self.unseen], self.targets[rows["zsl"]][:, : self.unseen])
        gzsl = evaluate_scores(scores[rows["gzsl"]], self.targets[rows["gzsl"]])
        return {name: {k: m[k] for k in ("mAP", "f1@3", "images")} for name, m in (("zsl", zsl), ("gzsl", gzsl))}


@dataclass
class Context:
    root: Path  # RUN/experiment
    config: ExperimentConfig
    setup: Setup
    classifier: ClassifierConfig  # the base of every trained arm
    test: TestSet
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))


def classifier_config(ctx: Context, seed: int, arm: Arm) -> ClassifierConfig:
    """The one ClassifierConfig of every trained arm; arms change only their data and fusion."""
    seen = str(seen_set(ctx.config, ctx.setup, ctx.root, seed)) if arm.seen_data else None
    base = prompt_head_config(ctx) if arm.prompt_head else ctx.classifier
    return dataclasses.replace(
        base,
        clip=ctx.setup.clip,
        steps=ctx.config.steps,
        seed=SeedSeeds.of(seed).classifier,
        source=arm.source,
        fusion=arm.fusion,
        seen_data=seen,
        holdout=0.0,
    )


def prompt_head_config(ctx: Context) -> ClassifierConfig:
    """seen-only's head: DualCoOp with one shared context, on the shared head's optimizer and augmentation (a
    toy CLIP's short text window takes a 4-token context; see ``--prompt-context``)."""
    context = 4 if ctx.setup.world is not None else ctx.classifier.prompt_context
    return dataclasses.replace(ctx.classifier, head="dualcoop", class_specific_context=False, prompt_context=context)


@functools.cache
def _stage_class(name: str) -> type[ClassifierStage]:
    return type(f"ExperimentStage_{name}", (ClassifierStage,), {"name": name})


def run_arm(ctx: Context, seed: int, arm: Arm) -> dict[str, Any]:
    """Train (if the arm trains) and score; returns the cell's figures."""
    if arm.kind == "zero-shot":
        return {**ctx.test.score(_zero_shot(ctx), ctx.test.classes), "images": 0, "steps": 0}
    if arm.kind == "s3":
        return {**ctx.test.score(_s3(ctx), ctx.test.classes), "images": 0, "steps": 0}
    if arm.kind == "text":
        from mlgen.experiment.textonly import text_only

        return text_only(ctx, seed, arm)
    return _stage_arm(ctx, seed, arm)


def _stage_arm(ctx: Context, seed: int, arm: Arm) -> dict[str, Any]:
    import json

    run = prepare(ctx.root, ctx.config, ctx.setup, seed, arm.run)
    config = classifier_config(ctx, seed, arm)
    run.require(config.source)
    stage = _stage_class(stage_name(arm))(run, config)
    run_stage(stage)
    metrics = json.loads((stage.folder / "metrics.json").read_text(encoding="utf-8"))
    model, preprocess = _load_for(stage.folder, ctx)
    logits = predict_logits(model, squash_transform(preprocess), ctx.test.images)
    return {
        **ctx.test.score(logits, model.classes),
        "images": metrics["train_images"],
        "steps": metrics["optimizer_steps"],
    }


def _load_for(folder: Path, ctx: Context):
    """The trained classifier, made to score every evaluation label (a shared prompt context scores names it
    never trained on; a per-class head cannot)."""
    from mlgen.classifiers.model import load_classifier, load_clip, read_config

    clip_model, preprocess, tokenizer = load_clip(read_config(folder)["clip"], ctx.device)
    model = load_classifier(clip_model, tokenizer, folder, ctx.device)
    missing = [c for c in ctx.test.classes if c not in model.classes]
    if missing:
        if not hasattr(model.head, "set_classes") or model.head.class_specific:
            raise MlgenError(
                f"the {model.head_name} head cannot score '{missing[0]}', which it never trained on "
                "(seen-only needs --head dualcoop with the shared context)"
            )
        model.head.set_classes(tokenizer, ctx.test.classes)
        model.classes = list(ctx.test.classes)
    return model, preprocess


_ZERO_SHOT: dict[tuple[str, int], np.ndarray] = {}


def _zero_shot(ctx: Context) -> np.ndarray:
    """The teacher's prompt-ensemble scores (the same for every seed: computed once per process)."""
    key = (ctx.setup.clip, id(ctx.test))
    if key not in _ZERO_SHOT:
        _ZERO_SHOT[key] = zero_shot_scores(ctx.setup.clip, ctx.test.images, ctx.test.classes, ctx.device)
    return _ZERO_SHOT[key]


def _s3(ctx: Context) -> np.ndarray:
    """S^3: each label's synonym space (the shared LLM prompt stage's synonyms), point-to-local-center score."""
    from mlgen.classifiers.evaluate import read_synonyms
    from mlgen.classifiers.features import image_features
    from mlgen.filters.s3 import s3_scores
    from mlgen.models.registry import load_open_clip

    shared = shared_prompts(ctx.root, ctx.config, ctx.setup, "llm")
    synonyms = read_synonyms(shared, ctx.test.classes)
    model, preprocess, tokenizer = load_open_clip(ctx.setup.clip, ctx.device)
    features = image_features(model, squash_transform(preprocess), ctx.test.images, ctx.device)
    with torch.inference_mode():
        spaces = [
            torch.nn.functional.normalize(model.encode_text(tokenizer(words).to(ctx.device)).float(), dim=-1).cpu()
            for words in synonyms
        ]
    return s3_scores(features, spaces).numpy()
