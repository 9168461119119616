"""Using a trained classifier: load it from the run directory and score image files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlgen.classifiers.features import image_features
from mlgen.classifiers.heads import LinearHead
from mlgen.classifiers.train_head import predict_scores
from mlgen.errors import MlgenError
from mlgen.models.registry import load_open_clip
from mlgen.pipeline.rundir import RunDir


def load_classifier(run: RunDir) -> tuple[LinearHead, dict]:
    run.require("classifier")
    folder = run.stage_dir("classifier")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    head = LinearHead(config["feature_dim"], len(config["classes"]))
    head.load_state_dict(load_file(folder / "model.safetensors"))
    return head.eval(), config


def predict_files(run: RunDir, images: list[Path], top_k: int = 3) -> list[list[tuple[str, float]]]:
    """The ``top_k`` labels and probabilities of each image file."""
    head, config = load_classifier(run)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise MlgenError(f"image not found: {missing[0]}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, _ = load_open_clip(config["clip"], device)
    try:
        features = image_features(model, preprocess, [p.read_bytes() for p in images], device)
    except OSError as err:  # PIL: not an image
        raise MlgenError(f"cannot read an image: {err}") from None
    scores = predict_scores(head, features)
    top = scores.topk(min(top_k, scores.shape[1]), dim=1)
    return [
        [(config["classes"][i], float(p)) for p, i in zip(values, indices, strict=True)]
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
