"""Did the CLIP filter drop the wrong images? A judge, independent of the filter's rule, checks every generated
image of a seed's ``mlgen`` run against the labels it was asked for, kept and dropped alike.

The judge is a linear probe on the teacher's frozen image features, one logistic output per label it knows.

- On a toy world it trains on ``JUDGE_IMAGES`` scenes of ALL eight shapes from the world's ``judge`` stream
  (``data/judge-SEED``, one set per seed like the seen and oracle sets, so a seed's interval includes the judge's
  own sampling). In the headroom world colours are shared in pairs (circle/ring, square/diamond, triangle/star,
  cross/heart): a judge that saw only the unseen shapes could read "purple" as "heart"; this one has seen crosses
  without hearts. Its false-positive rate on test scenes that hold a label's same-colour partner but not the
  label is recorded, as is its AP per label on the test scenes.
- With a user's own data (``--world none``) it trains, as before, on the ``--oracle-data`` images of the unseen
  labels (no partner is known there; the record says so).

Its learning rate and steps (:func:`tune_judge`) and its threshold per label (:func:`choose_thresholds`, the
logit that maximises TPR - FPR, which does not depend on the base rate) are chosen on a held-out quarter of the
judge's data, never on the test set. Generated images are not real scenes, so its verdicts on them are estimates;
they are compared between kept and dropped images of the same run. "Strict" = the judge sees exactly the labels
asked for (none of its other labels either); "lenient" = every asked label shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.evaluate import load_eval_set
from mlgen.classifiers.features import image_features
from mlgen.classifiers.metrics import average_precision, evaluate_scores, mean_average_precision
from mlgen.errors import MlgenError
from mlgen.experiment.cells import Context
from mlgen.experiment.data import oracle_set
from mlgen.filters.stage import image_of
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_json_atomic
from mlgen.shards.reader import finished_shards, iter_shard

JUDGE_IMAGES = 1024  # toy world: judge-stream scenes per seed (all 8 shapes, ~300 scenes per shape)
HELDOUT = 0.25  # the share of the judge's data that chooses its settings and thresholds
JUDGE_LRS = (3e-3, 1e-2, 3e-2, 1e-1)  # Adam learning rates tried
JUDGE_STEPS = (125, 250, 500, 1000, 2000)  # full-batch steps tried (checkpoints of one run per learning rate)


def audit_path(root: Path, seed: int) -> Path:
    return root / "audit" / f"{seed}.json"


def audit_seed(ctx: Context, seed: int) -> dict[str, Any] | None:
    """The seed's audit (``RUN/experiment/audit/SEED.json``, made once); None until its mlgen run is filtered
    or, on a user's data, without oracle images."""
    path = audit_path(ctx.root, seed)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    run = ctx.root / "runs" / str(seed) / "mlgen"
    if not (run / "filtered" / "_SUCCESS.json").is_file():
        return None
    try:
        judge, labels, features = train_judge(ctx, seed)
    except MlgenError:  # no --oracle-data: nothing to train a judge on
        return None
    unseen = ctx.setup.unseen
    asked, kept, generated = _generated(run, labels)
    shows = judge.shows(judge(features(generated)))
    test = ctx.test
    test_logits = judge(features(test.images))
    on_test = figures_on_test(test_logits, test.targets, test.classes, labels, judge.thresholds, partners(ctx))
    rows = test.targets[:, : test.unseen].any(axis=1)
    zsl = evaluate_scores(test_logits[rows][:, : len(unseen)], test.targets[rows][:, : test.unseen])["mAP"]
    shares = label_shares(asked, shows, kept, unseen)
    record = {
        "seed": seed,
        "judge": judge.record(labels),
        "judge_test_zsl_map": zsl,
        "kept": judged_shares(asked[kept], shows[kept]),
        "dropped": judged_shares(asked[~kept], shows[~kept]),
        "per_label": {label: {**shares[label], **on_test[label]} for label in unseen},
    }
    write_json_atomic(path, record)
    return record


def train_judge(ctx: Context, seed: int) -> tuple[Judge, list[str], Callable[[list[bytes]], torch.Tensor]]:
    """The seed's judge, its labels (the unseen first) and the teacher's image features (image bytes -> [N, D])."""
    data, source = judge_data(ctx, seed)
    features = teacher_features(ctx)
    unseen = ctx.setup.unseen
    labels = unseen + [s for s in _world_shapes(ctx) if s not in unseen]
    images, targets, _ = load_eval_set(data, labels)
    judge = fit_judge(features(images), targets, list(range(len(unseen))), seed)
    judge.data = source
    return judge, labels, features


def teacher_features(ctx: Context) -> Callable[[list[bytes]], torch.Tensor]:
    """Image bytes -> the teacher CLIP's L2-normalised image embeddings [N, D] (what the judge reads)."""
    model, preprocess, _ = load_open_clip(ctx.setup.clip, ctx.device)
    encode = squash_transform(preprocess)
    return lambda images: image_features(model, encode, images, ctx.device)


def _world_shapes(ctx: Context) -> list[str]:
    if ctx.setup.world is None:
        return []
    from mlgen.world.render import SHAPES

    return list(SHAPES)


def judge_data(ctx: Context, seed: int) -> tuple[Path, str]:
    """(the judge's labelled images, what they are): all shapes from the ``judge`` stream, or the user's oracle."""
    if ctx.setup.world is None:
        return oracle_set(ctx.config, ctx.setup, ctx.root, seed), (
            "oracle: --world none, the user's --oracle-data images of the unseen labels (the judge knows no other "
            "label, so it may read a feature the unseen labels share with others)"
        )
    from mlgen.world.render import SHAPES, render_dataset

    out = ctx.root / "data" / f"judge-{seed}"
    if not (out / "labels.csv").is_file():  # labels.csv is written last: the folder is complete
        render_dataset(out, JUDGE_IMAGES, seed, list(SHAPES), world=ctx.setup.world, stream="judge")
    what = f"judge stream: {JUDGE_IMAGES} {ctx.setup.world} scenes of all {len(SHAPES)} shapes (data/judge-{seed})"
    return out / "labels.csv", what


def partners(ctx: Context) -> dict[str, list[str]]:
    """Each shape's same-colour partners in the toy world (none on a user's data or in the classic world)."""
    if ctx.setup.world is None:
        return {}
    from mlgen.world.render import get_world

    colours = get_world(ctx.setup.world).colours
    return {a: [b for b in colours if b != a and colours[b][1] == colours[a][1]] for a in colours}


class Judge:
    """A trained probe: features -> logits [N, L]; ``shows`` applies the per-label thresholds."""

    def __init__(self, probe: torch.nn.Linear, thresholds: np.ndarray, heldout: list[dict], tuning: dict):
        self.probe, self.thresholds, self.heldout, self.tuning = probe, thresholds, heldout, tuning
        self.data = ""  # what it was trained on, for the record

    def __call__(self, features: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.probe(features * 10).numpy()

    def shows(self, logits: np.ndarray) -> np.ndarray:
        return logits > self.thresholds

    def record(self, labels: list[str]) -> dict[str, Any]:
        """Its settings and, per label, the threshold and the held-out TPR / FPR at it."""
        rows = zip(labels, self.thresholds, self.heldout, strict=True)
        per_label = {label: {"threshold": float(t), **held} for label, t, held in rows}
        return {"data": self.data, **self.tuning, "per_label": per_label}


def fit_judge(features: torch.Tensor, targets: np.ndarray, audited: list[int], seed: int) -> Judge:
    """Split off the last ``HELDOUT`` share, choose lr/steps and the thresholds there, train on the rest."""
    n_held = max(1, round(HELDOUT * len(features))) if len(features) > 1 else 0
    cut = len(features) - n_held
    x, y, hx, hy = features[:cut], targets[:cut], features[cut:], targets[cut:]
    tuning = tune_judge(x, y, hx, hy, audited, seed)
    probe = _train_probe(x, y, seed, tuning["lr"], [tuning["steps"]])[tuning["steps"]]
    with torch.no_grad():
        held_logits = probe(hx * 10).numpy()
    thresholds, heldout = choose_thresholds(held_logits, hy)
    tuning["train_images"], tuning["heldout_images"] = cut, n_held
    return Judge(probe, thresholds, heldout, tuning)


def tune_judge(
    x: torch.Tensor, y: np.ndarray, hx: torch.Tensor, hy: np.ndarray, audited: list[int], seed: int
) -> dict[str, Any]:
    """The (lr, steps) of :data:`JUDGE_LRS` x :data:`JUDGE_STEPS` with the best held-out mAP over the audited
    labels (ties: the earlier pair, fewer steps and a smaller rate). Rerun it on any features and targets."""
    grid = []
    for lr in JUDGE_LRS:
        for steps, probe in _train_probe(x, y, seed, lr, list(JUDGE_STEPS)).items():
            with torch.no_grad():
                logits = probe(hx * 10).numpy()
            score = mean_average_precision(logits[:, audited], hy[:, audited]) if len(hy) else float("nan")
            grid.append({"lr": lr, "steps": steps, "heldout_map": None if np.isnan(score) else score})
    scored = [g for g in grid if g["heldout_map"] is not None]
    best = max(scored, key=lambda g: g["heldout_map"]) if scored else {"lr": 3e-2, "steps": 1000}
    return {"lr": best["lr"], "steps": best["steps"], "tuning": grid}


def _train_probe(
    features: torch.Tensor, targets: np.ndarray, seed: int, lr: float, checkpoints: list[int]
) -> dict[int, torch.nn.Linear]:
    """A logistic probe (full batch, Adam), copied at each checkpoint step."""
    import copy

    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], targets.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    y = torch.from_numpy(targets)
    out = {}
    for step in range(1, max(checkpoints) + 1):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(probe(features * 10), y).backward()
        optimizer.step()
        if step in checkpoints:
            out[step] = copy.deepcopy(probe)
    return out


def choose_thresholds(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per label, the threshold (midway between two held-out logits) that maximises TPR - FPR, with its held-out
    TPR and FPR; a label without positives or negatives there keeps logit 0."""
    thresholds, report = np.zeros(logits.shape[1]), []
    for c in range(logits.shape[1]):
        positive = targets[:, c] > 0
        if positive.all() or not positive.any():
            report.append({"tpr": None, "fpr": None})
            continue
        values = np.unique(logits[:, c])
        candidates = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
        shown = logits[:, c][None, :] > candidates[:, None]
        tpr, fpr = shown[:, positive].mean(axis=1), shown[:, ~positive].mean(axis=1)
        best = int(np.argmax(tpr - fpr))
        thresholds[c] = candidates[best]
        report.append({"tpr": float(tpr[best]), "fpr": float(fpr[best])})
    return thresholds, report


def figures_on_test(
    logits: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    labels: list[str],
    thresholds: np.ndarray,
    partner_of: dict[str, list[str]],
) -> dict[str, dict[str, Any]]:
    """Per judge label on the test scenes (``targets`` over ``classes``): its AP, and on the scenes that hold a
    same-colour partner but not the label, how many there are and the share the judge says show the label."""
    out = {}
    for j, label in enumerate(labels):
        if label not in classes:
            continue
        truth = targets[:, classes.index(label)] > 0
        ap = average_precision(logits[:, j], truth) if len(truth) else float("nan")
        present = [p for p in partner_of.get(label, []) if p in classes]
        confusable = np.zeros(len(truth), dtype=bool)
        for partner in present:
            confusable |= targets[:, classes.index(partner)] > 0
        confusable &= ~truth
        out[label] = {
            "test_ap": None if np.isnan(ap) else ap,
            "partner": ",".join(present) or None,
            "partner_scenes": int(confusable.sum()),
            "partner_false_positive": _mean(logits[confusable, j] > thresholds[j]),
        }
    return out


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _generated(run: Path, labels: list[str]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """(labels asked [N, L] bool over ``labels``, kept by the filter [N] bool, image bytes) of every generated
    image."""
    decisions = {}
    for file in sorted((run / "filtered").glob("*_decisions.parquet")):
        for row in pq.read_table(file, columns=["key", "labels", "kept"]).to_pylist():
            decisions[row["key"]] = row
    asked, kept, images = [], [], []
    for shard in finished_shards(run / "raw"):
        for sample in iter_shard(run / "raw", shard):
            row = decisions[sample["__key__"]]
            asked.append([label in row["labels"] for label in labels])
            kept.append(row["kept"])
            images.append(image_of(sample)[1])
    return np.array(asked, dtype=bool).reshape(len(asked), len(labels)), np.array(kept, dtype=bool), images


def judged_shares(asked: np.ndarray, shows: np.ndarray) -> dict[str, Any]:
    """How many images, and the share the judge says show exactly (strict) / at least (lenient) the labels asked
    for; ``asked`` and ``shows`` are [N, L] over all the judge's labels."""
    if not len(asked):
        return {"images": 0, "exact": None, "all_asked_shown": None}
    return {
        "images": len(asked),
        "exact": float((asked == shows).all(axis=1).mean()),
        "all_asked_shown": float((shows | ~asked).all(axis=1).mean()),
    }


def label_shares(asked: np.ndarray, shows: np.ndarray, kept: np.ndarray, audited: list[str]) -> dict[str, dict]:
    """Per audited label (the first columns): of the images asked for it, how many, the share the filter kept, and
    for kept and dropped ones the share the judge says show it, show strictly / leniently what was asked."""
    strict = (asked == shows).all(axis=1)
    lenient = (shows | ~asked).all(axis=1)
    out = {}
    for c, label in enumerate(audited):
        mine = asked[:, c]
        entry: dict[str, Any] = {"asked": int(mine.sum()), "kept_share": _mean(kept[mine])}
        for side, rows in (("kept", mine & kept), ("dropped", mine & ~kept)):
            entry[f"judge_shows_{side}"] = _mean(shows[rows, c])
            entry[f"strict_{side}"] = _mean(strict[rows])
            entry[f"lenient_{side}"] = _mean(lenient[rows])
        out[label] = entry
    return out


def audit_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the audited seeds: the judge's settings and test figures, and per kept/dropped and per label the
    shares the judge accepts (a key an older record lacks is left out of its mean)."""

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(np.mean(values)) if values else None

    out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
    out["judge_test_zsl_map"] = mean([r["judge_test_zsl_map"] for r in records])
    judges = [r.get("judge", {}) for r in records]
    out["judge"] = {
        "data": next((j["data"] for j in judges if "data" in j), "oracle images (an older audit)"),
        "lr": sorted({j["lr"] for j in judges if "lr" in j}),
        "steps": sorted({j["steps"] for j in judges if "steps" in j}),
    }
    for side in ("kept", "dropped"):
        out[side] = {key: mean([r[side][key] for r in records]) for key in ("exact", "all_asked_shown")}
        out[side]["images"] = mean([r[side]["images"] for r in records])
    labels = records[0]["per_label"] if records else {}
    out["per_label"] = {}
    for label in labels:
        entries = [r["per_label"].get(label, {}) for r in records]
        keys = dict.fromkeys(k for e in entries for k in e)
        summary = {k: mean([e.get(k) for e in entries]) for k in keys if k != "partner"}
        summary["partner"] = next((e["partner"] for e in entries if e.get("partner")), None)
        out["per_label"][label] = summary
    return out


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def audit_table(summary: dict[str, Any]) -> str:
    """Markdown: the judge, its verdict on kept vs dropped images, and per label (strict and lenient side by side,
    with the judge's test AP and partner false-positive rate)."""
    judge = summary.get("judge", {})
    settings = ", ".join(
        f"{name} {'/'.join(f'{v:g}' for v in judge.get(name, []))}" for name in ("lr", "steps") if judge.get(name)
    )
    lines = [
        f"\nFilter audit over seeds {', '.join(map(str, summary['seeds']))}: a linear probe on the teacher's "
        f"features, trained on {judge.get('data', 'the oracle images')}"
        f"{f' ({settings}, chosen on held-out judge data)' if settings else ''}; test ZSL mAP "
        f"{_num(summary['judge_test_zsl_map'])}. It judges every generated image of the mlgen run. Strict: the "
        "judge sees exactly the labels asked; lenient: every asked label shown.\n",
        "| images | per seed | strict | lenient |",
        "|---|---|---|---|",
    ]
    for side in ("kept", "dropped"):
        entry = summary[side]
        lines.append(f"| {side} | {entry['images']:.0f} | {pct(entry['exact'])} | {pct(entry['all_asked_shown'])} |")
    lines += [
        "",
        "| label | kept share | judge shows it: kept / dropped | strict: kept / dropped | lenient: kept / dropped "
        "| judge test AP | partner | judge false positive on partner scenes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, e in summary["per_label"].items():
        g = e.get
        lines.append(
            f"| {label} | {pct(g('kept_share'))} | {pct(g('judge_shows_kept'))} / {pct(g('judge_shows_dropped'))} "
            f"| {pct(g('strict_kept'))} / {pct(g('strict_dropped'))} "
            f"| {pct(g('lenient_kept'))} / {pct(g('lenient_dropped'))} | {_num(g('test_ap'))} "
            f"| {g('partner') or '-'} | {pct(g('partner_false_positive'))} |"
        )
    return "\n".join(lines) + "\n"
