"""Using a trained classifier: load it from the run directory and score image files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.model import load_trained
from mlgen.errors import MlgenError
from mlgen.pipeline.rundir import RunDir


def load_run_classifier(run: RunDir, device=None):
    """(classifier, preprocess, config) of the run's ``classifier/`` folder (the one load path)."""
    run.require("classifier")
    return load_trained(run.stage_dir("classifier"), device)


def predict_logits(model, transform, images: list[bytes], batch_size: int = 64) -> np.ndarray:
    """Logits [N, C] (float64) of encoded images through ``transform`` (raises OSError for a non-image).

    Metrics rank these, never float32 probabilities: a sigmoid is 1.0 in float32 above a logit of ~17."""
    device = next(model.parameters()).device
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch]).to(device)
        with torch.no_grad():
            chunks.append(model(pixels).double().cpu())
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, len(model.classes)))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Sigmoid in float64 (what users are shown; rankings use the logits)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def predict_files(run: RunDir, images: list[Path]) -> list[dict[str, float]]:
    """Per image file (checked to exist by the caller): every label the classifier knows -> its probability."""
    model, preprocess, config = load_run_classifier(run)
    try:
        logits = predict_logits(model, squash_transform(preprocess), [p.read_bytes() for p in images])
    except OSError as err:  # PIL: not an image
        raise MlgenError(f"cannot read an image: {err}") from None
    return [dict(zip(config["classes"], map(float, row), strict=True)) for row in probabilities(logits).tolist()]


def format_predictions(images: list[Path], scores: list[dict[str, float]], fmt: str) -> str:
    """JSON lines (``image``, ``scores``) or a CSV (``image`` then one column per label)."""
    if fmt == "jsonl":
        return "".join(json.dumps({"image": str(p), "scores": s}) + "\n" for p, s in zip(images, scores, strict=True))
    out = io.StringIO()
    labels = list(scores[0]) if scores else []
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", *labels])
    for path, row in zip(images, scores, strict=True):
        writer.writerow([str(path), *(f"{row[label]:.6f}" for label in labels)])
    return out.getvalue()
