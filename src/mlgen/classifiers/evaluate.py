"""Evaluation of the trained classifier on REAL labelled images, as the papers measure it.

ZSL: only the unseen labels (``--labels``) are scored, on the images with at least one unseen label;
GZSL: every label the model knows, on the images with at least one label (the official subsets). Beside
both, CLIP zero-shot (a prompt ensemble) on the same images and labels. Every ranking metric reads logits
(a float32 sigmoid saturates to 1.0 above ~17 and then ties). Classes with no positive image are reported
and left out of mAP (sklearn's rule; the papers' helper counts them as AP 0).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgen.classifiers.data import decodable, read_labelled, squash_transform
from mlgen.classifiers.features import image_features, label_embeddings
from mlgen.classifiers.inputs import check_zero_shot_inputs, synonyms_table
from mlgen.classifiers.metrics import evaluate_scores, per_class_average_precision, threshold_metrics
from mlgen.classifiers.predict import load_run_classifier, predict_logits
from mlgen.errors import MlgenError
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_atomic
from mlgen.pipeline.rundir import RunDir

# CLIP's zero-shot baseline averages the text embeddings of these (a short prompt ensemble).
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image containing a {}.",
    "a photo of the {}.",
    "a rendering of a {}.",
)
AP_RULE = "classes without a positive image are left out of mAP (sklearn); the papers' helper counts them as AP 0"
SUBSETS = {
    "zsl": "test images with at least one unseen label (official)",
    "gzsl": "test images with at least one label (official)",
}


def subsets(targets: np.ndarray, pick: list[int]) -> dict[str, np.ndarray]:
    """The official evaluation rows: ZSL images with at least one of the ``pick`` (unseen) labels, GZSL
    images with at least one label."""
    return {"zsl": targets[:, pick].any(axis=1), "gzsl": targets.any(axis=1)}


def load_eval_set(data: Path, classes: list[str]) -> tuple[list[bytes], np.ndarray, dict[str, Any]]:
    """(image bytes, targets [N, C] over ``classes``, a report of what was skipped or unknown)."""
    index = {label: i for i, label in enumerate(classes)}
    images, rows, unknown, corrupt = [], [], Counter(), []
    for item in read_labelled(data):
        if not decodable(item.image):
            corrupt.append(item.key)
            continue
        unknown.update(label for label in item.labels if label not in index)
        images.append(item.image)
        rows.append([index[label] for label in item.labels if label in index])
    if not images:
        raise MlgenError(f"{data}: no readable images ({len(corrupt)} could not be read)")
    known = {label for row in rows for label in (classes[i] for i in row)}
    if not known:
        raise MlgenError(
            f"{data}: none of its labels ({', '.join(sorted(unknown)[:5])}) is a label of the classifier "
            f"({', '.join(classes[:5])}...): the checkpoint's labels differ from the data"
        )
    targets = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for r, row in enumerate(rows):
        targets[r, row] = 1
    report = {"images": len(images), "corrupt_images_skipped": len(corrupt), "unknown_labels": dict(unknown)}
    return images, targets, report


def _setting(scores: np.ndarray, targets: np.ndarray, classes: list[str], logits: bool) -> dict[str, Any]:
    """All figures of one setting: mAP, per-class AP, P/R/F1@3 and (for logits) CP/CR/CF1/OP/OR/OF1 at
    probability 0.5 (logit 0)."""
    if not len(scores):
        raise MlgenError("no evaluation image has a label of this setting (ZSL needs images with an unseen label)")
    ap = per_class_average_precision(scores, targets)
    metrics: dict[str, Any] = evaluate_scores(scores, targets)
    metrics["per_class_AP"] = {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, ap, strict=True)}
    metrics["classes_without_positives"] = [c for c, v in zip(classes, ap, strict=True) if np.isnan(v)]
    if logits:
        metrics.update(threshold_metrics(scores, targets, threshold=0.0))  # logit 0 = probability 0.5
    return metrics


def zero_shot_scores(clip: str, images: list[bytes], classes: list[str], device: torch.device) -> np.ndarray:
    """CLIP zero-shot with the prompt ensemble: cosine of each image to each class's mean text embedding
    (the images squash-resized, as the classifier sees them)."""
    model, preprocess, tokenizer = load_open_clip(clip, device)
    features = image_features(model, squash_transform(preprocess), images, device)
    text = torch.stack([label_embeddings(model, tokenizer, classes, device, t) for t in ZERO_SHOT_TEMPLATES])
    return (features @ torch.nn.functional.normalize(text.mean(0), dim=-1).T).numpy()


def evaluate_on_data(run: RunDir, data: Path, unseen: list[str] | None = None) -> dict[str, Any]:
    """ZSL, GZSL and CLIP zero-shot figures of the run's classifier on the labelled images in ``data``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, config = load_run_classifier(run, device)
    classes: list[str] = config["classes"]
    unseen = unseen or classes
    missing = [label for label in unseen if label not in classes]
    if missing:
        raise MlgenError(f"--labels names '{missing[0]}', which the classifier was not trained on")
    images, targets, report = load_eval_set(data, classes)
    logits = predict_logits(model, squash_transform(preprocess), images)
    zero_shot = zero_shot_scores(config["clip"], images, classes, device)
    pick = [classes.index(label) for label in unseen]
    rows = subsets(targets, pick)
    zsl, gzsl = (np.ix_(rows["zsl"], pick), rows["gzsl"])
    zero_shot_zsl = _setting(zero_shot[zsl], targets[zsl], unseen, logits=False)
    return {
        "data": str(data),
        "ap_rule": AP_RULE,
        "subsets": SUBSETS,
        "ranked_by": "logits (probabilities saturate in float32)",
        **report,
        "zsl": _setting(logits[zsl], targets[zsl], unseen, logits=True),
        "gzsl": _setting(logits[gzsl], targets[gzsl], classes, logits=True),
        "zero_shot_clip": {
            "mAP": zero_shot_zsl["mAP"],  # the ZSL figure, beside the classifier's zsl mAP
            "zsl": zero_shot_zsl,
            "gzsl": _setting(zero_shot[gzsl], targets[gzsl], classes, logits=False),
            "templates": list(ZERO_SHOT_TEMPLATES),
        },
    }


def plot_per_class_ap(metrics: dict[str, Any], out: Path) -> None:
    """A bar chart of per-class AP (GZSL), the classifier beside CLIP zero-shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, baseline = metrics["gzsl"]["per_class_AP"], metrics["zero_shot_clip"]["gzsl"]["per_class_AP"]
    labels = list(ours)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(labels) + 2), 3.5))
    ax.bar(x - 0.2, [ours[c] or 0 for c in labels], 0.4, label="classifier")
    ax.bar(x + 0.2, [baseline[c] or 0 for c in labels], 0.4, label="CLIP zero-shot")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("AP")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def read_synonyms(run: RunDir, classes: list[str]) -> list[list[str]]:
    """Each class's name and its synonyms from the prompt stage (the S^3 point sets, as the filter reads them)."""
    import pyarrow.parquet as pq

    path = synonyms_table(run)
    words = {label: [label] for label in classes}
    for row in pq.read_table(path, columns=["label", "synonym"]).to_pylist():
        if row["label"] in words and row["synonym"] not in words[row["label"]]:
            words[row["label"]].append(row["synonym"])
    return [words[label] for label in classes]


def zero_shot_on_data(
    run: RunDir, data: Path, method: str, clip: str, unseen: list[str] | None = None
) -> dict[str, Any]:
    """A training-free baseline on real labelled images: ``clip`` (prompt ensemble) or ``s3`` (synonym spaces,
    point-to-local-center score), over the run's labels; ZSL on ``unseen`` (default all), GZSL on all."""
    from mlgen.filters.s3 import s3_scores

    check_zero_shot_inputs(run, data, method)
    classes = run.classes()
    unseen = unseen or classes
    missing = [label for label in unseen if label not in classes]
    if missing:
        raise MlgenError(f"--labels names '{missing[0]}', which is not a label of the run")
    synonyms = read_synonyms(run, classes) if method == "s3" else None
    images, targets, report = load_eval_set(data, classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if synonyms is None:
        scores = zero_shot_scores(clip, images, classes, device)
    else:
        model, preprocess, tokenizer = load_open_clip(clip, device)
        features = image_features(model, squash_transform(preprocess), images, device)
        with torch.inference_mode():
            spaces = [
                torch.nn.functional.normalize(model.encode_text(tokenizer(words).to(device)).float(), dim=-1).cpu()
                for words in synonyms
            ]
        scores = s3_scores(features, spaces).numpy()
    pick = [classes.index(label) for label in unseen]
    rows = subsets(targets, pick)
    zsl, gzsl = (np.ix_(rows["zsl"], pick), rows["gzsl"])
    return {
        "data": str(data),
        "method": method,
        "clip": clip,
        "ap_rule": AP_RULE,
        "subsets": SUBSETS,
        **report,
        "zsl": _setting(scores[zsl], targets[zsl], unseen, logits=False),
        "gzsl": _setting(scores[gzsl], targets[gzsl], classes, logits=False),
        **(
            {"templates": list(ZERO_SHOT_TEMPLATES)}
            if method == "clip"
            else {"synonyms": dict(zip(classes, synonyms, strict=True))}
        ),
    }
