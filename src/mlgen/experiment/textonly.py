"""The ``text-embedding-head`` arm: the head trained on the CLIP text embeddings of the generated prompts instead
of their images. It shares TaI-DPT's idea (text as training data for an image classifier) but not its method
(TaI-DPT learns prompt contexts through the text encoder with a ranking loss), hence the name. Everything else
is the classifier stage's: the same ClassifierConfig, the official schedule (a real seen-label pass, then the
synthetic pass, ``pass_steps`` steps each), the per-source label masks, and the best epoch on the validation
scenes, through :func:`mlgen.classifiers.train.fit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from mlgen.classifiers.cache import FeatureCache
from mlgen.classifiers.data import AugmentedView, squash_transform, train_transform
from mlgen.classifiers.metrics import evaluate_scores
from mlgen.classifiers.model import build_classifier, head_options, load_clip
from mlgen.classifiers.predict import predict_logits
from mlgen.classifiers.source import Source, labelled_samples, multi_hot
from mlgen.classifiers.train import Pass, fit, fixed_length
from mlgen.config import ClassifierConfig
from mlgen.errors import MlgenError
from mlgen.experiment.runs import seed_run, shared_prompts


def prompt_texts(prompts_folder: Path) -> tuple[list[str], list[list[str]]]:
    table = pq.read_table(prompts_folder / "prompts.parquet", columns=["text", "labels"]).to_pylist()
    return [row["text"] for row in table], [list(row["labels"]) for row in table]


def text_features(clip_model, tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    """What an image's cached features hold, from text: the embedding as ``pooled`` and as a one-region map."""
    with torch.no_grad():
        emb = torch.cat(
            [
                clip_model.encode_text(tokenizer(texts[i : i + 256]).to(device)).float()
                for i in range(0, len(texts), 256)
            ]
        )
    return {"pooled": emb.cpu(), "dense": emb[:, None, :].cpu()}


def text_only(ctx, seed: int, config: ClassifierConfig) -> dict[str, Any]:
    """The text-embedding-head arm under ``config`` (the arms' one classifier config, made by the caller: this
    module does not import mlgen.experiment.cells, which imports it)."""
    if config.head == "cprfl":
        raise MlgenError("text-embedding-head needs a head on pooled or dense features (linear, dualcoop), not cprfl")
    texts, labels = prompt_texts(shared_prompts(ctx.root, ctx.config, ctx.setup, "llm").stage_dir("prompts"))
    seen_labels, seen_images, _ = labelled_samples(Path(config.seen_data))
    unseen = ctx.setup.unseen
    classes = unseen + sorted({x for row in seen_labels for x in row} - set(unseen))
    clip_model, preprocess, tokenizer = load_clip(config.clip, ctx.device)
    model = build_classifier(
        clip_model,
        tokenizer,
        classes,
        config.head,
        False,
        ctx.device,
        config.head_init,
        config.seed,
        **head_options(config),
    )
    mask = torch.tensor([c in unseen for c in classes]) if config.label_masks else None
    synthetic = Source(
        multi_hot(labels, classes),
        torch.ones(len(texts), dtype=torch.bool),
        text_features(clip_model, tokenizer, texts, ctx.device),
        columns=mask,
    )
    real = _real_source(ctx, seed, model, preprocess, config, (seen_labels, seen_images), classes, mask)
    b = config.batch_size
    passes = [
        Pass(lambda epoch: real.batches(epoch, b, config.seed + 1), real.columns, "real"),
        Pass(lambda epoch: synthetic.batches(epoch, b, config.seed), mask),
    ]
    if config.pass_steps is not None:
        passes = [fixed_length(one, config.pass_steps) for one in passes]
    select = _selector(ctx, seed, model, preprocess, config, classes) if config.val_data else None
    result = fit(
        model,
        passes,
        config.epochs,
        config.loss,
        config.lr,
        seed=config.seed,
        steps=config.steps,
        optimizer=config.optimizer,
        select=select,
    )
    logits = predict_logits(model, squash_transform(preprocess), ctx.test.images)
    return {
        **ctx.test.score(logits, model.classes),
        "images": len(texts),
        "steps": result.optimizer_steps,
        "real_steps": result.steps_by_pass.get("real", 0),
        "synthetic_steps": result.steps_by_pass.get("synthetic", 0),
        "images_per_label": {label: sum(label in row for row in labels) for label in unseen},
        "selected_epoch": result.selected_epoch,
    }


def _selector(ctx, seed, model, preprocess, config, classes):
    """The validation mAP over the unseen labels (images holding one), as the classifier stage scores it."""
    val_labels, val_images, _ = labelled_samples(Path(config.val_data))
    cache = FeatureCache(seed_run(ctx.root, seed, "text-only").root, config.clip, model)
    features = cache.features(val_images(), squash_transform(preprocess), config.batch_size, tag="squash")
    columns = [classes.index(label) for label in ctx.setup.unseen]
    rows = torch.tensor([any(label in ctx.setup.unseen for label in row) for row in val_labels])
    truth = multi_hot(val_labels, classes)[rows][:, columns].numpy()
    inputs = {k: v[rows].float() for k, v in features.items()}

    def score(trained) -> float:
        trained.eval()
        with torch.no_grad():
            logits = trained.forward_features(inputs).double()[:, columns].numpy()
        return evaluate_scores(logits, truth)["mAP"]

    return score


def _real_source(ctx, seed, model, preprocess, config, seen, classes, mask) -> Source:
    """The seen real images as the stage reads them: K cached augmented views (or the squash view)."""
    labels, images = seen
    cache = FeatureCache(seed_run(ctx.root, seed, "text-only").root, config.clip, model)
    if config.augment:
        view = train_transform(preprocess)
        views = [
            cache.features(images(), AugmentedView(view, v), config.batch_size, tag=f"aug{v}")
            for v in range(config.augment_views)
        ]
        features = None
    else:
        views, features = None, cache.features(images(), squash_transform(preprocess), config.batch_size, tag="squash")
    columns = None if mask is None else ~mask
    rows = torch.ones(len(labels), dtype=torch.bool)
    return Source(multi_hot(labels, classes), rows, features=features, views=views, columns=columns)
