"""One (seed, arm) cell: train what the arm says (or nothing) and score it on the seed's real test set.

Trained arms go through the classifier stage (``ClassifierStage`` under the arm's own folder) with one
``ClassifierConfig``: the same head, optimizer, augmentation, epochs and ``pass_steps`` optimizer steps per pass
(so the same steps on the seen and on the unseen columns, whatever the image count), and the best epoch on the
seed's validation scenes; they differ in their data (``source``, the run) and where the arm's name says
(fusion, the paper's head). ``text-embedding-head`` cannot read images, so it runs the same schedule through
:func:`mlgen.classifiers.train.fit` itself: the seen real images pass (seen columns) then the prompts' text
embeddings (unseen columns).
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
    path: str = ""

    @classmethod
    def load(cls, data: Path, setup: Setup) -> TestSet:
        images, targets, _ = load_eval_set(data, setup.classes)
        return cls(images, targets, setup.classes, len(setup.unseen), str(data))

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
    test: TestSet | None = None  # the seed's test set (``for_seed``)
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def for_seed(self, seed: int) -> Context:
        """This context scoring on the seed's own test draw."""
        from mlgen.experiment.data import test_set

        return dataclasses.replace(
            self, test=TestSet.load(test_set(self.config, self.setup, self.root, seed), self.setup)
        )


PASSES_PER_EPOCH = 2  # a real pass then a synthetic pass; one-source arms get an empty second pass


def classifier_config(ctx: Context, seed: int, arm: Arm) -> ClassifierConfig:
    """The one ClassifierConfig of every trained arm: the same epochs, steps per pass, learning-rate curve and
    checkpoint selection on the seed's validation scenes; arms change their data and what their name says."""
    from mlgen.experiment.data import val_set

    seen = str(seen_set(ctx.config, ctx.setup, ctx.root, seed)) if arm.seen_data else None
    val = val_set(ctx.config, ctx.setup, ctx.root, seed)
    base = paper_config(ctx) if arm.paper else prompt_head_config(ctx) if arm.prompt_head else ctx.classifier
    return dataclasses.replace(
        base,
        clip=ctx.setup.clip,
        epochs=ctx.config.probe_epochs if arm.probe else ctx.config.epochs,
        steps=None,
        pass_steps=ctx.config.pass_steps,
        passes_per_epoch=PASSES_PER_EPOCH,
        val_data=str(val) if val else None,
        val_labels=tuple(ctx.setup.unseen),  # every arm, seen-only and the probe included: one selection metric
        seed=SeedSeeds.of(seed).classifier,
        source=arm.source,
        soft_targets=arm.soft_targets,
        fusion=arm.fusion,
        cache=arm.cache,
        seen_data=seen,
        holdout=0.0,
    )


def prompt_head_config(ctx: Context) -> ClassifierConfig:
    """seen-only's head: DualCoOp with one shared context, on the shared head's optimizer and augmentation (a
    toy CLIP's short text window takes a 4-token context; see ``--prompt-context``)."""
    context = 4 if ctx.setup.world is not None else ctx.classifier.prompt_context
    return dataclasses.replace(ctx.classifier, head="dualcoop", class_specific_context=False, prompt_context=context)


# The paper arm's SGD learning rate for a world where validation chose another than the official 0.002
# (bench/tune_experiment.py --questions paper; README gives the figures): with toy-headroom-2 both toy worlds
# chose 0.002, so none today.
PAPER_LR: dict[str, float] = {}


def paper_lr(config: ExperimentConfig) -> float:
    """The paper arm's SGD rate: ``paper_lr``, else the world's (recorded in the experiment's settings)."""
    return config.paper_lr or PAPER_LR.get(config.world or "", 0.002)


def paper_config(ctx: Context) -> ClassifierConfig:
    """The paper's classifier: DualCoOp with one shared context and the GlobalBranch fusion, the official ASL
    and SGD at :func:`paper_lr`."""
    return dataclasses.replace(prompt_head_config(ctx), loss="asl", optimizer="sgd", lr=paper_lr(ctx.config))


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

        return text_only(ctx, seed, classifier_config(ctx, seed, arm))
    return _stage_arm(ctx, seed, arm)


def _stage_arm(ctx: Context, seed: int, arm: Arm) -> dict[str, Any]:
    import json

    from mlgen.experiment.data import MatchedConfig, MatchedStage

    run = prepare(ctx.root, ctx.config, ctx.setup, seed, arm.run)
    config = classifier_config(ctx, seed, arm)
    if config.source == "matched":
        run_stage(MatchedStage(run, MatchedConfig(SeedSeeds.of(seed).classifier)))
    run.require(config.source)
    stage = _stage_class(stage_name(arm))(run, config)
    run_stage(stage)
    metrics = json.loads((stage.folder / "metrics.json").read_text(encoding="utf-8"))
    model, preprocess = _load_for(stage.folder, ctx)
    logits = predict_logits(model, squash_transform(preprocess), ctx.test.images)
    figures = {**ctx.test.score(logits, model.classes), **training_figures(arm, metrics, run)}
    return {**figures, **filter_figures(config.source, run)}


def filter_figures(source: str, run) -> dict[str, Any]:
    """What the arm's filter did: ``kept_share`` (images kept / generated) and ``gated`` (the labels it did not
    filter on: the teacher cannot read them, so every image of theirs passes on them); both None for an arm that
    trains on no filter's choice (raw or matched images, real images, no training)."""
    import json

    from mlgen.classifiers.source import shard_samples
    from mlgen.filters.stage import RELIABILITY

    if source != "filtered" or run.success("raw") is None:
        return {"kept_share": None, "gated": None}
    kept = sum(1 for _ in shard_samples(run.stage_dir("filtered")))
    generated = sum(1 for _ in shard_samples(run.stage_dir("raw")))
    path = run.stage_dir("filtered") / RELIABILITY
    labels = json.loads(path.read_text(encoding="utf-8"))["labels"] if path.is_file() else []
    return {
        "kept_share": round(kept / generated, 4) if generated else None,
        "kept": kept,
        "generated": generated,
        "gated": [entry["label"] for entry in labels if entry.get("gated")],
    }


def training_figures(arm: Arm, metrics: dict[str, Any], run) -> dict[str, Any]:
    """What a cell trained on: optimizer steps on the seen-label (real) and unseen-label (synthetic, or the
    oracle's real) passes, images, images per label, and the validated epoch it kept."""
    from collections import Counter

    from mlgen.classifiers.source import shard_samples

    by_pass = metrics.get("steps_by_pass") or {}
    real, synthetic = by_pass.get("real", 0), by_pass.get("synthetic", 0)
    if not arm.seen_data:  # seen-only: its one source is the real seen-label images
        real, synthetic = synthetic, 0
    per_label = Counter(label for meta, _ in shard_samples(run.stage_dir(arm.source)) for label in meta["labels"])
    return {
        "images": metrics["train_images"],
        "steps": metrics["optimizer_steps"],
        "real_steps": real,
        "synthetic_steps": synthetic,
        "images_per_label": dict(sorted(per_label.items())),
        "selected_epoch": metrics.get("selected_epoch"),
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


_ZERO_SHOT: dict[tuple[str, str], np.ndarray] = {}


def _zero_shot(ctx: Context) -> np.ndarray:
    """The teacher's prompt-ensemble scores (the same for every seed: computed once per process)."""
    key = (ctx.setup.clip, ctx.test.path)
    if key not in _ZERO_SHOT:
        _ZERO_SHOT[key] = zero_shot_scores(ctx.setup.clip, ctx.test.images, ctx.test.classes, ctx.device)
    return _ZERO_SHOT[key]


def _s3(ctx: Context) -> np.ndarray:
    """S^3: each label's synonym space (the shared LLM prompt stage's synonyms), point-to-local-center score.
    Each synonym is embedded with the zero-shot arm's prompt ensemble (templates averaged), so S^3 and zero-shot
    differ only in the synonyms."""
    from mlgen.classifiers.evaluate import ZERO_SHOT_TEMPLATES, read_synonyms
    from mlgen.classifiers.features import image_features, label_embeddings
    from mlgen.filters.s3 import s3_scores
    from mlgen.models.registry import load_open_clip

    shared = shared_prompts(ctx.root, ctx.config, ctx.setup, "llm")
    synonyms = read_synonyms(shared, ctx.test.classes)
    model, preprocess, tokenizer = load_open_clip(ctx.setup.clip, ctx.device)
    features = image_features(model, squash_transform(preprocess), ctx.test.images, ctx.device)
    spaces = []
    for words in synonyms:
        per_template = torch.stack(
            [label_embeddings(model, tokenizer, words, ctx.device, t) for t in ZERO_SHOT_TEMPLATES]
        )
        spaces.append(torch.nn.functional.normalize(per_template.mean(0), dim=-1))
    return s3_scores(features, spaces).numpy()
