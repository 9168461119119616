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

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": 0, "kind": "train"}]

    def setup(self, ranks: Ranks) -> None:
        self.device = ranks.device
        self.model, self.preprocess, self.tokenizer = load_open_clip(self.config.clip, ranks.device)

    def load_data(self) -> tuple[list[int], list[bytes], torch.Tensor]:
        """(label-set id, image bytes, multi-hot targets) of every sample of the source stage."""
        groups, images, rows = [], [], []
        index = {label: i for i, label in enumerate(self.classes)}
        folder = self.run.stage_dir(self.config.source)
        for shard in finished_shards(folder):
            for sample in iter_shard(folder, shard):
                meta = json.loads(sample["json"])
                groups.append(meta["set_id"])
                images.append(image_of(sample)[1])
                rows.append([index[label] for label in meta["labels"]])
        targets = torch.zeros(len(rows), len(self.classes))
        for i, labels in enumerate(rows):
            targets[i, labels] = 1
        return groups, images, targets

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        groups, images, targets = self.load_data()
        if len(set(groups)) < 2:
            raise MlgenError(
                f"the {self.config.source} stage has {len(images)} images of {len(set(groups))} label sets: "
                "too few to train and hold out a label set "
                "(generate more images or lower the filter --threshold)"
            )
        test = held_out(groups, self.config.holdout)
        features = image_features(self.model, self.preprocess, images, self.device)
        class_embeddings = label_embeddings(self.model, self.tokenizer, self.classes, self.device)
        c = self.config
        head, losses = train_linear_head(
            features[~test],
            targets[~test],
            class_embeddings if c.head_init == "text" else None,
            c.epochs,
            lr=c.lr,
            batch_size=c.batch_size,
            seed=c.seed,
        )
        metrics = {
            "synthetic_heldout": evaluate_scores(predict_scores(head, features[test]).numpy(), targets[test].numpy()),
            "zero_shot_clip_heldout": evaluate_scores(
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
