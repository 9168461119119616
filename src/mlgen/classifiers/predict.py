"""Using a trained classifier: load it from the run directory and score image files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mlgen.classifiers.model import load_trained, predict_images
from mlgen.errors import MlgenError
from mlgen.pipeline.rundir import RunDir


def load_run_classifier(run: RunDir, device=None):
    """(classifier, preprocess, config) of the run's ``classifier/`` folder (the one load path)."""
    run.require("classifier")
    return load_trained(run.stage_dir("classifier"), device)


def predict_files(run: RunDir, images: list[Path]) -> list[dict[str, float]]:
    """Per image file: every label the classifier knows -> its probability."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise MlgenError(f"image not found: {missing[0]}")
    model, preprocess, config = load_run_classifier(run)
    try:
        scores = predict_images(model, preprocess, [p.read_bytes() for p in images])
    except OSError as err:  # PIL: not an image
        raise MlgenError(f"cannot read an image: {err}") from None
    return [dict(zip(config["classes"], map(float, row), strict=True)) for row in scores.tolist()]


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
