"""Evaluation of the trained classifier on REAL labelled images, as the papers measure it.

ZSL: only the unseen labels (``--labels``) are scored, on the images with at least one unseen label;
GZSL: every label the model knows, on the images with at least one label (the official subsets). Beside
both, CLIP zero-shot (a prompt ensemble) on the same images and labels. Every ranking metric reads logits
(a float32 sigmoid saturates to 1.0 above ~17 and then ties). Classes with no positive image are reported
and left out of mAP (sklearn's rule; the papers' helper counts them as AP 0). On a whole benchmark
(``coco-zsl:ROOT``, ``nus-zsl:ROOT``) the figures are the published ones by default: AP 0 for such a class,
images squash-resized with bilinear interpolation as the official test transform, and beside the saved
weights the checkpoints chosen on the test split (``--select official``/``both``), labelled as such.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlgen.classifiers.benchmarks import TOP_K, LazyImages, Spec, Split, data_exists, open_split, parse_spec
from mlgen.classifiers.data import decodable, read_labelled, squash_transform
from mlgen.classifiers.features import image_features, label_embeddings
from mlgen.classifiers.inputs import check_zero_shot_inputs, synonyms_table
from mlgen.classifiers.metrics import evaluate_scores, per_class_average_precision, threshold_metrics
from mlgen.classifiers.predict import load_run_classifier, predict_logits
from mlgen.errors import MlgenError
from mlgen.labels import alias_setting, aliases_from_mapping, names_of
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
PLOT_LABELS = 100
AP_RULE = "classes without a positive image are left out of mAP (sklearn); the papers' helper counts them as AP 0"
AP_RULES = {
    "sklearn": AP_RULE,
    "official": "a class without a positive image counts as AP 0 and stays in mAP (the official helper's rule)",
}
SUBSETS = {
    "zsl": "test images with at least one unseen label (official)",
    "gzsl": "test images with at least one label (official)",
}


def subsets(targets: np.ndarray, pick: list[int]) -> dict[str, np.ndarray]:
    """The official evaluation rows: ZSL images with at least one of the ``pick`` (unseen) labels, GZSL
    images with at least one label."""
    return {"zsl": targets[:, pick].any(axis=1), "gzsl": targets.any(axis=1)}


def load_eval_set(
    data: Path, classes: list[str], image_folders: tuple[Path, ...] = ()
) -> tuple[list[bytes], np.ndarray, dict[str, Any]]:
    """(image bytes, targets [N, C] over ``classes``, a report of what was skipped or unknown); a COCO JSON's
    images are looked up in ``image_folders`` first."""
    index = {label: i for i, label in enumerate(classes)}
    images, rows, unknown, corrupt, missing = [], [], Counter(), [], []
    for item in read_labelled(data, image_folders):
        if item.image is None:  # not there (or not readable as a file)
            missing.append(item.key)
            continue
        if not decodable(item.image):
            corrupt.append(item.key)
            continue
        unknown.update(label for label in item.labels if label not in index)
        images.append(item.image)
        rows.append([index[label] for label in item.labels if label in index])
    if not images:
        raise MlgenError(f"{data}: no readable images ({len(missing)} not there, {len(corrupt)} could not be decoded)")
    known = {label for row in rows for label in (classes[i] for i in row)}
    if not known:
        raise MlgenError(
            f"{data}: none of its labels ({', '.join(sorted(unknown)[:5])}) is a label of the classifier "
            f"({', '.join(classes[:5])}...): the checkpoint's labels differ from the data"
        )
    targets = np.zeros((len(rows), len(classes)), dtype=np.float32)
    for r, row in enumerate(rows):
        targets[r, row] = 1
    report = {
        "images": len(images),
        "missing_images_skipped": len(missing),
        "missing_images_first": missing[:3],
        "corrupt_images_skipped": len(corrupt),
        "unknown_labels": dict(unknown),
    }
    return images, targets, report


def _setting(
    scores: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    logits: bool,
    top_k: tuple[int, ...] = (3,),
    ap_rule: str = "sklearn",
) -> dict[str, Any]:
    """All figures of one setting: mAP, per-class AP, P/R/F1 at each ``top_k`` and (for logits) CP/CR/CF1/OP/OR/OF1
    at probability 0.5 (logit 0)."""
    if not len(scores):
        raise MlgenError("no evaluation image has a label of this setting (ZSL needs images with an unseen label)")
    ap = per_class_average_precision(scores, targets)
    metrics: dict[str, Any] = {}
    for k in top_k:
        metrics.update(evaluate_scores(scores, targets, k, ap_rule))
    metrics["labels"] = list(classes)
    metrics["per_class_AP"] = {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, ap, strict=True)}
    metrics["classes_without_positives"] = [c for c, v in zip(classes, ap, strict=True) if np.isnan(v)]
    if logits:
        metrics.update(threshold_metrics(scores, targets, threshold=0.0))  # logit 0 = probability 0.5
    return metrics


def zero_shot_text(model, tokenizer, names: list[list[str]], device: torch.device) -> torch.Tensor:
    """[C, D] zero-shot text embeddings: each name's prompt ensemble (the normalised mean over the templates),
    then the normalised mean over a class's names (its label, then its aliases; the label alone without)."""
    flat = [name for group in names for name in group]
    per_template = torch.stack([label_embeddings(model, tokenizer, flat, device, t) for t in ZERO_SHOT_TEMPLATES])
    per_name = torch.nn.functional.normalize(per_template.mean(0), dim=-1)
    groups = per_name.split([len(group) for group in names])
    return torch.nn.functional.normalize(torch.stack([group.mean(0) for group in groups]), dim=-1)


def zero_shot_scores(
    clip: str,
    images: list[bytes],
    classes: list[str],
    device: torch.device,
    aliases: dict[str, list[str]] | None = None,
) -> np.ndarray:
    """CLIP zero-shot with the prompt ensemble: cosine of each image to each class's text embedding
    (:func:`zero_shot_text` over the class's names; the images squash-resized, as the classifier sees them)."""
    model, preprocess, tokenizer = load_open_clip(clip, device)
    features = image_features(model, squash_transform(preprocess), images, device)
    text = zero_shot_text(model, tokenizer, [names_of(label, aliases) for label in classes], device)
    return (features @ text.T).numpy()


def default_unseen(classes: list[str], seen_labels: list[str]) -> list[str]:
    """The ZSL labels without ``--labels``: those the classifier did not see in real images (all without any)."""
    return [label for label in classes if label not in set(seen_labels)] or classes


def evaluate_on_data(
    run: RunDir,
    data: Path,
    unseen: list[str] | None = None,
    ap_rule: str | None = None,
    image_folders: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """ZSL, GZSL and CLIP zero-shot figures of the run's classifier on the labelled images in ``data``
    (a whole benchmark, ``coco-zsl:ROOT``: its unseen and GZSL test splits, as the papers)."""
    spec = parse_spec(data)
    if spec is not None and spec.split is None:
        return _evaluate_benchmark(run, spec, unseen, ap_rule or "official")
    if not data_exists(data):  # before the classifier and CLIP load
        raise MlgenError(f"evaluation data not found: {data}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, config = load_run_classifier(run, device)
    classes: list[str] = config["classes"]
    unseen_given = bool(unseen)
    unseen = unseen or default_unseen(classes, config.get("seen_labels", []))
    missing = [label for label in unseen if label not in classes]
    if missing:
        raise MlgenError(f"--labels names '{missing[0]}', which the classifier was not trained on")
    images, targets, report = load_eval_set(data, classes, image_folders)
    logits = predict_logits(model, squash_transform(preprocess), images)
    zero_shot = zero_shot_scores(config["clip"], images, classes, device)
    pick = [classes.index(label) for label in unseen]
    rows = subsets(targets, pick)
    zsl, gzsl = (np.ix_(rows["zsl"], pick), rows["gzsl"])
    rule = ap_rule or "sklearn"
    zero_shot_zsl = _setting(zero_shot[zsl], targets[zsl], unseen, logits=False, ap_rule=rule)
    return {
        "data": str(data),
        "ap_rule": AP_RULES[rule],
        "ap_rule_name": rule,
        "subsets": SUBSETS,
        "ranked_by": "logits (probabilities saturate in float32)",
        "zsl_labels": "--labels" if unseen_given else "the labels the classifier saw no real image of",
        **report,
        "zsl": _setting(logits[zsl], targets[zsl], unseen, logits=True, ap_rule=rule),
        "gzsl": _setting(logits[gzsl], targets[gzsl], classes, logits=True, ap_rule=rule),
        "zero_shot_clip": {
            "mAP": zero_shot_zsl["mAP"],  # the ZSL figure, beside the classifier's zsl mAP
            "zsl": zero_shot_zsl,
            "gzsl": _setting(zero_shot[gzsl], targets[gzsl], classes, logits=False, ap_rule=rule),
            "templates": list(ZERO_SHOT_TEMPLATES),
        },
    }


def plot_per_class_ap(metrics: dict[str, Any], out: Path) -> None:
    """A bar chart of per-class AP (GZSL), the classifier beside CLIP zero-shot (up to ``PLOT_LABELS`` labels:
    NUS-WIDE's 1,006 bars would not be read; its per-class AP is in metrics.json)."""
    if len(metrics["gzsl"]["per_class_AP"]) > PLOT_LABELS:
        return
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
    run: RunDir,
    data: Path,
    method: str,
    clip: str,
    unseen: list[str] | None = None,
    aliases: dict[str, list[str]] | None = None,
    image_folders: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """A training-free baseline on real labelled images: ``clip`` (prompt ensemble) or ``s3`` (synonym spaces,
    point-to-local-center score), over the run's labels; ZSL on ``unseen`` (default all), GZSL on all.
    ``aliases`` (``--label-aliases``): the user's other names of labels, which join each label's names
    (clip: the mean of the names' embeddings; s3: its point set)."""
    check_zero_shot_inputs(run, data, method)
    spec = parse_spec(data)
    if spec is not None and spec.split is None:
        return _zero_shot_benchmark(run, spec, method, clip, unseen, aliases)
    classes = run.classes()  # the generated labels: unseen ones (a benchmark above scores its own)
    aliases = aliases_from_mapping(aliases, "--label-aliases", classes)
    unseen = unseen or default_unseen(classes, _trained_seen_labels(run))
    missing = [label for label in unseen if label not in classes]
    if missing:
        raise MlgenError(f"--labels names '{missing[0]}', which is not a label of the run")
    synonyms = _with_aliases(read_synonyms(run, classes), classes, aliases) if method == "s3" else None
    images, targets, report = load_eval_set(data, classes, image_folders)
    scores = _training_free_scores(clip, images, classes, synonyms, aliases)
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
        **_aliases_entry(aliases),
    }


def _with_aliases(synonyms: list[list[str]], classes: list[str], aliases: dict[str, list[str]] | None) -> list:
    """Each class's S^3 point set (its name and synonyms) followed by its aliases, each name once."""
    return [names_of(label, {label: words[1:]}, aliases) for label, words in zip(classes, synonyms, strict=True)]


def _aliases_entry(aliases: dict[str, list[str]] | None) -> dict[str, Any]:
    """metrics.json's ``aliases`` (only the labels that have some), when any was given."""
    setting = alias_setting(aliases)
    return {"aliases": setting} if setting else {}


def _trained_seen_labels(run: RunDir) -> list[str]:
    """The real seen labels the run's classifier trained on (none without a classifier)."""
    from mlgen.classifiers.model import read_config

    folder = run.stage_dir("classifier")
    return list(read_config(folder).get("seen_labels", [])) if (folder / "config.json").is_file() else []


def _training_free_scores(
    clip: str,
    images,
    classes: list[str],
    synonyms: list[list[str]] | None,
    aliases: dict[str, list[str]] | None = None,
) -> np.ndarray:
    """CLIP zero-shot (prompt ensemble over each class's names) scores, or S^3 scores over each class's
    synonym space (``synonyms``: the point sets, aliases included)."""
    from mlgen.filters.s3 import s3_scores

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if synonyms is None:
        return zero_shot_scores(clip, images, classes, device, aliases)
    model, preprocess, tokenizer = load_open_clip(clip, device)
    features = image_features(model, squash_transform(preprocess), images, device)
    with torch.inference_mode():
        spaces = [
            torch.nn.functional.normalize(model.encode_text(tokenizer(words).to(device)).float(), dim=-1).cpu()
            for words in synonyms
        ]
    return s3_scores(features, spaces).numpy()


# --- a whole benchmark (coco-zsl:ROOT, nus-zsl:ROOT): the papers' ZSL and GZSL tables ----------------------


def _benchmark_splits(spec: Spec, unseen: list[str] | None) -> dict[str, Split]:
    """The ZSL (unseen test) and GZSL test splits, checked before any model loads."""
    if unseen:
        raise MlgenError(f"{spec}: the benchmark fixes its unseen labels; leave out --labels")
    return {"zsl": open_split(spec, "unseen-test"), "gzsl": open_split(spec, "gzsl-test")}


def _benchmark_metrics(
    spec: Spec, splits: dict[str, Split], scores_of, logits: bool, ap_rule: str = "official"
) -> dict[str, Any]:
    """Each setting scored as the official code: every image of its split, its labels' columns (ZSL: the
    unseen labels; GZSL: all). ``scores_of(images, labels)`` scores the union of both splits' images once."""
    files = list(dict.fromkeys(path for split in splits.values() for path in split.files))
    labels = (splits.get("gzsl") or next(iter(splits.values()))).classes
    try:
        scores = scores_of(LazyImages(files), labels)
    except OSError as err:  # PIL: a file that is not an image
        raise MlgenError(f"{spec}: cannot read an image ({err})") from None
    row = {path: i for i, path in enumerate(files)}
    out: dict[str, Any] = {"settings": {}}
    for name, split in splits.items():
        rows, cols = [row[path] for path in split.files], [labels.index(label) for label in split.classes]
        targets = np.zeros((len(rows), len(split.classes)), dtype=np.float32)
        index = {label: c for c, label in enumerate(split.classes)}
        for r, found in enumerate(split.labels):
            targets[r, [index[label] for label in found if label in index]] = 1
        out[name] = _setting(scores[np.ix_(rows, cols)], targets, split.classes, logits, TOP_K[spec.benchmark], ap_rule)
        out["settings"][name] = {
            "split": split.spec.split,
            "annotations": str(split.annotation),
            "images": len(rows),
            "images_without_a_label": int((targets.sum(1) == 0).sum()),
            "labels": len(split.classes),
            "missing_images_skipped": len(split.skipped),  # :skip-missing; the first three as written
            "missing_images_first": list(split.skipped[:3]),
        }
    return out


def _benchmark_header(spec: Spec, ap_rule: str = "official") -> dict[str, Any]:
    return {
        "data": str(spec),
        "benchmark": spec.benchmark,
        "ap_rule": AP_RULES[ap_rule],
        "ap_rule_name": ap_rule,
        "test_resize": "squash to the model's input side, bilinear (the official test transform)",
        "subsets": {
            "zsl": "every image of the unseen test split, scored on the unseen labels (official)",
            "gzsl": "every image of the GZSL test split, scored on every label (official)",
        },
        "corrupt_images_skipped": 0,
        "unknown_labels": {},
    }


def _evaluate_benchmark(run: RunDir, spec: Spec, unseen: list[str] | None, ap_rule: str = "official") -> dict:
    """The classifier and CLIP zero-shot on a benchmark's ZSL and GZSL test splits; with test-selected
    checkpoints (``classifier/official/``) their figures too, each setting scored with its own checkpoint."""
    splits = _benchmark_splits(spec, unseen)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, config = load_run_classifier(run, device)
    classes: list[str] = config["classes"]
    official = _official_checkpoints(run, spec, splits, ap_rule, device)
    missing = [label for label in splits["gzsl"].classes if label not in set(classes)]
    if missing:
        raise MlgenError(
            f"the classifier does not know {len(missing)} label(s) of {spec.benchmark} (e.g. '{missing[0]}'): train "
            f"it on the {len(splits['zsl'].classes)} unseen labels with --seen-data {spec.benchmark}:ROOT:seen-train"
        )

    ours = _benchmark_metrics(spec, splits, _scorer(model, preprocess, classes), True, ap_rule)
    clip = _benchmark_metrics(
        spec, splits, lambda im, lab: zero_shot_scores(config["clip"], im, lab, device), False, ap_rule
    )
    if config.get("selected"):  # --select official: the saved weights are the ZSL choice; GZSL has its own
        ours = {**ours, "zsl": official["zsl"], "gzsl": official["gzsl"], "selected": official["label"]}
    return {
        **_benchmark_header(spec, ap_rule),
        "ranked_by": "logits (probabilities saturate in float32)",
        **ours,
        **({"official": official} if official and not config.get("selected") else {}),
        "zero_shot_clip": {
            "mAP": clip["zsl"]["mAP"],
            "zsl": clip["zsl"],
            "gzsl": clip["gzsl"],
            "templates": list(ZERO_SHOT_TEMPLATES),
        },
    }


def _scorer(model, preprocess, classes: list[str]):
    """``scores_of(images, labels)`` of a trained classifier: logits of the bilinear squash view (official test)."""

    def scores_of(images, labels: list[str]) -> np.ndarray:
        logits = predict_logits(model, squash_transform(preprocess, "bilinear"), images)
        return logits[:, [classes.index(label) for label in labels]]

    return scores_of


def _official_checkpoints(run: RunDir, spec: Spec, splits: dict[str, Split], ap_rule: str, device) -> dict | None:
    """The figures of the checkpoints chosen on the TEST split (``--select official``/``both``): ZSL with the
    ZSL-best one, GZSL with the GZSL-best one, as the official script reports them; None without them."""
    from mlgen.classifiers.model import load_trained
    from mlgen.classifiers.stage import OFFICIAL_FOLDER, OFFICIAL_SELECTION

    folder = run.stage_dir("classifier") / OFFICIAL_FOLDER
    if not all((folder / name / "config.json").is_file() for name in splits):
        return None
    out: dict[str, Any] = {"label": OFFICIAL_SELECTION, "epochs": {}}
    for name in splits:
        model, preprocess, config = load_trained(folder / name, device)
        scored = _benchmark_metrics(
            spec, {name: splits[name]}, _scorer(model, preprocess, config["classes"]), True, ap_rule
        )
        out[name] = scored[name]
        out["epochs"][name] = config.get("selected_epoch")
    return out


def _zero_shot_benchmark(
    run: RunDir, spec: Spec, method: str, clip: str, unseen: list[str] | None, aliases: dict[str, list[str]] | None
) -> dict:
    """A training-free baseline on a benchmark's ZSL and GZSL test splits (its own labels, not the run's)."""
    splits = _benchmark_splits(spec, unseen)
    labels = splits["gzsl"].classes
    aliases = aliases_from_mapping(aliases, "--label-aliases", labels)
    synonyms = _with_aliases(read_synonyms(run, labels), labels, aliases) if method == "s3" else None

    def scores_of(images, names: list[str]) -> np.ndarray:
        return _training_free_scores(clip, images, names, synonyms, aliases)

    extra = {"templates": list(ZERO_SHOT_TEMPLATES)} if method == "clip" else {"synonyms_from": "the run's prompts"}
    return {
        **_benchmark_header(spec),
        "method": method,
        "clip": clip,
        **_benchmark_metrics(spec, splits, scores_of, logits=False),
        **extra,
        **_aliases_entry(aliases),
    }
