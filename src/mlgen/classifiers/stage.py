"""The classifier stage: frozen CLIP image features + a trained head, evaluated on held-out images."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import save_file

from mlgen.classifiers.features import image_features, label_embeddings
from mlgen.classifiers.metrics import evaluate_scores
from mlgen.classifiers.train_head import predict_scores, train_linear_head
from mlgen.config import ClassifierConfig
from mlgen.errors import MlgenError
from mlgen.filters.stage import image_of
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_atomic, write_json_atomic
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.runner import Stage
from mlgen.shards.reader import finished_shards, iter_shard


def held_out(keys: list[str], fraction: float) -> torch.Tensor:
    """A stable split (the same keys always split the same way) with at least one image per side."""
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).digest())
    count = min(max(1, round(len(keys) * fraction)), len(keys) - 1)
    mask = torch.zeros(len(keys), dtype=torch.bool)
    mask[order[:count]] = True
    return mask


class ClassifierStage(Stage):
    """One unit of work: train on the kept images, evaluate on a held-out part of them."""

    name = "classifier"
    config_section = "classifier"
    requires = ("filtered",)

    def __init__(self, run, config: ClassifierConfig) -> None:
        super().__init__(run, config)
        self.classes = run.classes()

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": 0, "kind": "train"}]

    def setup(self, ranks: Ranks) -> None:
        self.device = ranks.device
        self.model, self.preprocess, self.tokenizer = load_open_clip(self.config.clip, ranks.device)

    def load_data(self) -> tuple[list[str], list[bytes], torch.Tensor]:
        keys, images, rows = [], [], []
        index = {label: i for i, label in enumerate(self.classes)}
        folder = self.run.stage_dir("filtered")
        for shard in finished_shards(folder):
            for sample in iter_shard(folder, shard):
                keys.append(sample["__key__"])
                images.append(image_of(sample)[1])
                rows.append([index[label] for label in json.loads(sample["json"])["labels"]])
        targets = torch.zeros(len(rows), len(self.classes))
        for i, labels in enumerate(rows):
            targets[i, labels] = 1
        return keys, images, targets

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        keys, images, targets = self.load_data()
        if len(keys) < 2:
            raise MlgenError(
                f"the filter kept {len(keys)} images: too few to train and hold out a test part "
                "(generate more images or lower the filter --threshold)"
            )
        test = held_out(keys, self.config.holdout)
        features = image_features(self.model, self.preprocess, images, self.device)
        class_embeddings = label_embeddings(self.model, self.tokenizer, self.classes, self.device)
        c = self.config
        head, losses = train_linear_head(
            features[~test], targets[~test], class_embeddings, c.epochs, lr=c.lr, batch_size=c.batch_size, seed=c.seed
        )
        metrics = {
            "test": evaluate_scores(predict_scores(head, features[test]).numpy(), targets[test].numpy()),
            "zero_shot_clip_test": evaluate_scores(
                (features[test] @ class_embeddings.T).numpy(), targets[test].numpy()
            ),
            "train_images": int((~test).sum()),
            "final_loss": losses[-1] if losses else None,
        }
        self.save(head, metrics)
        return {"train_images": metrics["train_images"], "test_images": int(test.sum())}

    def save(self, head: torch.nn.Module, metrics: dict[str, Any]) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        write_atomic(self.folder / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
        write_json_atomic(
            self.folder / "config.json",
            {
                "head": "linear",
                "clip": self.config.clip,
                "classes": self.classes,
                "feature_dim": int(state["weight"].shape[1]),
            },
        )
        write_json_atomic(self.folder / "metrics.json", metrics)
