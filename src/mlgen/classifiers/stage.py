"""The classifier stage: what ClassifierConfig says (backbone, fusion, head, loss), trained with ``fit``.

The training images are the source stage's shards (filtered by default), optionally with real images of
seen labels (``seen_data``: alternating epochs as the paper, or mixed). A label-set split of the synthetic
images is held out and scored: a SYNTHETIC figure, never the real test (``mlgen evaluate --data``).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgen.classifiers.cache import FeatureCache
from mlgen.classifiers.features import label_embeddings
from mlgen.classifiers.metrics import evaluate_scores
from mlgen.classifiers.model import MultiLabelClassifier, build_classifier, load_clip, save_classifier
from mlgen.classifiers.source import Source, labelled_samples, mixed, multi_hot, shard_samples
from mlgen.classifiers.train import alternating, fit
from mlgen.config import ClassifierConfig
from mlgen.errors import MlgenError
from mlgen.paths import write_json_atomic
from mlgen.pipeline.ranks import Ranks, current_ranks
from mlgen.pipeline.runner import Stage

THRESHOLD = 0.5  # the decision threshold saved with the model (CP/CR/CF1 and OP/OR/OF1 use it)


def held_out(groups: list[int], fraction: float) -> torch.Tensor:
    """A stable split by label set: every image of a held-out set is held out (no prompt on both sides).

    About ``fraction`` of the sets (at least one, and at least one left to train on), chosen by a hash
    of the set id so the same run always splits the same way.
    """
    sets = sorted(set(groups), key=lambda g: hashlib.sha256(str(g).encode()).digest())
    count = min(max(1, round(len(sets) * fraction)), len(sets) - 1)
    chosen = set(sets[:count])
    return torch.tensor([g in chosen for g in groups], dtype=torch.bool)


class ClassifierStage(Stage):
    """One unit of work: train on the kept images, evaluate on a held-out part of them."""

    name = "classifier"
    config_section = "classifier"
    requires = ("filtered",)

    def __init__(self, run, config: ClassifierConfig) -> None:
        super().__init__(run, config)
        self.classes = run.classes()
        self.requires = (config.source,)  # "raw": the same classifier without the filter (an ablation)
        if config.seen_data and not Path(config.seen_data).exists():
            raise MlgenError(f"--seen-data not found: {config.seen_data}")

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if current_ranks().world_size > 1:  # the plan has one unit per rank (below)
            settings["processes"] = current_ranks().world_size
        return settings

    def plan(self) -> list[dict[str, Any]]:
        # one unit per rank: under torchrun every rank runs ``fit`` on its slice of each global batch
        return [{"shard": r, "kind": "train"} for r in range(current_ranks().world_size)]

    def setup(self, ranks: Ranks) -> None:
        self.device = ranks.device
        self.clip_model, self.preprocess, self.tokenizer = load_clip(self.config.clip, ranks.device)

    def _source(self, model: MultiLabelClassifier, cache: FeatureCache | None, targets, rows, images) -> Source:
        if cache is None:
            return Source(targets, rows, images=images, preprocess=self.preprocess)
        return Source(targets, rows, features=cache.features(images(), self.preprocess, self.config.batch_size))

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        folder = self.run.stage_dir(c.source)
        metas = [meta for meta, _ in shard_samples(folder)]
        groups = [meta["set_id"] for meta in metas]
        if len(set(groups)) < 2:
            raise MlgenError(
                f"the {c.source} stage has {len(metas)} images of {len(set(groups))} label sets: "
                "too few to train and hold out a label set "
                "(generate more images or lower the filter --threshold)"
            )
        seen_labels, seen_images, seen_skipped = labelled_samples(Path(c.seen_data)) if c.seen_data else ([], None, 0)
        extra = sorted({label for labels in seen_labels for label in labels} - set(self.classes))
        classes = self.classes + extra  # GZSL: the seen labels of the real data beside the generated ones
        targets = multi_hot([meta["labels"] for meta in metas], classes)
        test = held_out(groups, c.holdout)
        model = build_classifier(
            self.clip_model, self.tokenizer, classes, c.head, c.fusion, self.device, c.head_init, c.seed
        )
        cache = FeatureCache(self.run.root, c.clip, model) if model.cacheable and c.cache else None

        def images():
            return (image for _, image in shard_samples(folder))

        started = time.perf_counter()
        synthetic = self._source(model, cache, targets, ~test, images)
        heldout = Source(targets, test, images=images, preprocess=self.preprocess)
        if synthetic.features is not None:
            heldout.features = synthetic.features
        # before training: the fused encoder is still the frozen one, so this is CLIP's own zero-shot score
        zero_shot = self._zero_shot(model, heldout, classes)
        batches = lambda epoch: synthetic.batches(epoch, c.batch_size, c.seed)  # noqa: E731
        steps = math.ceil(len(synthetic) / c.batch_size)
        if seen_images is not None:
            seen_targets = multi_hot(seen_labels, classes)
            seen = self._source(model, cache, seen_targets, torch.ones(len(seen_labels), dtype=torch.bool), seen_images)
            real = lambda epoch: seen.batches(epoch, c.batch_size, c.seed + 1)  # noqa: E731
            batches = alternating(real, batches) if c.schedule == "alternating" else mixed(real, batches)
            steps = max(steps, math.ceil(len(seen) / c.batch_size))
        history = fit(model, batches, c.epochs, c.loss, c.lr, steps_per_epoch=steps, seed=c.seed)
        self.model = model  # the trained classifier, for callers that drive the stage themselves (tests)
        scores = self._scores(model, heldout)
        metrics = {
            "synthetic_heldout": evaluate_scores(scores, targets[test].numpy()),
            "zero_shot_clip_heldout": evaluate_scores(zero_shot, targets[test].numpy()),
            "synthetic_heldout_split": "by label set: no prompt's images on both sides",
            "train_images": len(synthetic),
            "seen_images": len(seen_labels),
            "seen_images_skipped": seen_skipped,
            "final_loss": history[-1] if history else None,
            "train_seconds": round(time.perf_counter() - started, 3),
            "feature_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
        }
        if shard["shard"] != 0:  # the other ranks trained the same model; rank 0 writes it
            return {}
        save_classifier(
            model,
            self.folder,
            clip=c.clip,
            backbone=c.clip,
            loss=c.loss,
            thresholds=dict.fromkeys(classes, THRESHOLD),
            seen_labels=extra,
        )
        write_json_atomic(self.folder / "metrics.json", metrics)
        return {"train_images": metrics["train_images"], "test_images": int(test.sum())}

    def _scores(self, model: MultiLabelClassifier, source: Source) -> np.ndarray:
        """Sigmoid probabilities of the source's rows, in order."""
        model.eval()
        chunks = []
        with torch.no_grad():
            for inputs, _ in source.batches(0, 256, 0, shuffle=False):
                if isinstance(inputs, dict):
                    logits = model.forward_features({k: v.to(self.device) for k, v in inputs.items()})
                else:
                    logits = model(inputs.to(self.device))
                chunks.append(torch.sigmoid(logits.float()).cpu())
        return torch.cat(chunks).numpy()

    def _zero_shot(self, model: MultiLabelClassifier, source: Source, classes: list[str]) -> np.ndarray:
        text = label_embeddings(self.clip_model, self.tokenizer, classes, self.device)
        chunks = []
        for inputs, _ in source.batches(0, 256, 0, shuffle=False):
            if not isinstance(inputs, dict):
                inputs = model.frozen_features(inputs.to(self.device))
            pooled = inputs["pooled"]
            chunks.append(torch.nn.functional.normalize(pooled.float().cpu(), dim=-1) @ text.T)
        return torch.cat(chunks).numpy()
