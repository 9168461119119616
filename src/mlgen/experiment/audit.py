"""Did the CLIP filter drop the wrong images? A judge, independent of the filter's rule, checks every generated
image of a seed's ``mlgen`` run against the labels it was asked for, kept and dropped alike.

The judge is a linear probe (one logistic output per unseen label) on the teacher's frozen image features,
trained on the seed's oracle images: real labelled scenes of the unseen labels, which the filter never sees. It
is the oracle arm's ceiling in classifier form, so it knows what the teacher's features can tell apart, where the
filter knows only what the teacher's text tower can name. Its own mAP on the real test set is recorded beside
the audit: a judge no better than the teacher would say nothing. Generated images are not real scenes, so the
judge's verdicts on them are estimates; they are compared between kept and dropped images of the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.evaluate import load_eval_set
from mlgen.classifiers.features import image_features
from mlgen.classifiers.metrics import evaluate_scores
from mlgen.errors import MlgenError
from mlgen.experiment.cells import Context
from mlgen.experiment.data import oracle_set
from mlgen.filters.stage import image_of
from mlgen.models.registry import load_open_clip
from mlgen.paths import write_json_atomic
from mlgen.shards.reader import finished_shards, iter_shard

JUDGE_STEPS = 1000


def audit_path(root: Path, seed: int) -> Path:
    return root / "audit" / f"{seed}.json"


def audit_seed(ctx: Context, seed: int) -> dict[str, Any] | None:
    """The seed's audit (``RUN/experiment/audit/SEED.json``, made once); None until its mlgen run is filtered
    or without oracle images."""
    path = audit_path(ctx.root, seed)
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    run = ctx.root / "runs" / str(seed) / "mlgen"
    if not (run / "filtered" / "_SUCCESS.json").is_file():
        return None
    try:
        oracle = oracle_set(ctx.config, ctx.setup, ctx.root, seed)
    except MlgenError:  # no --oracle-data: nothing to train a judge on
        return None
    unseen, device = ctx.setup.unseen, ctx.device
    model, preprocess, _ = load_open_clip(ctx.setup.clip, device)
    encode = squash_transform(preprocess)
    oracle_images, oracle_targets, _ = load_eval_set(oracle, unseen)
    judge = _train_judge(image_features(model, encode, oracle_images, device), oracle_targets, seed)
    asked, kept, images = _generated(run, unseen)
    shows = judge(image_features(model, encode, images, device)) > 0.0
    test = ctx.test
    rows = test.targets[:, : test.unseen].any(axis=1)
    test_logits = judge(image_features(model, encode, [test.images[i] for i in np.flatnonzero(rows)], device))
    record = {
        "seed": seed,
        "judge_test_zsl_map": evaluate_scores(test_logits, test.targets[rows][:, : test.unseen])["mAP"],
        "kept": judged_shares(asked[kept], shows[kept]),
        "dropped": judged_shares(asked[~kept], shows[~kept]),
        "per_label": {
            label: {
                "asked": int(asked[:, c].sum()),
                "kept_share": _mean(kept[asked[:, c]]),
                "judge_shows_kept": _mean(shows[asked[:, c] & kept, c]),
                "judge_shows_dropped": _mean(shows[asked[:, c] & ~kept, c]),
            }
            for c, label in enumerate(unseen)
        },
    }
    write_json_atomic(path, record)
    return record


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _train_judge(features: torch.Tensor, targets: np.ndarray, seed: int):
    """A logistic probe (full batch, Adam); returns features -> logits [N, C] as numpy."""
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], targets.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-2, weight_decay=1e-4)
    y = torch.from_numpy(targets)
    for _ in range(JUDGE_STEPS):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(probe(features * 10), y).backward()
        optimizer.step()
    return lambda x: probe(x * 10).detach().numpy()


def _generated(run: Path, unseen: list[str]) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """(labels asked [N, C] bool, kept by the filter [N] bool, image bytes) of every generated image."""
    decisions = {}
    for file in sorted((run / "filtered").glob("*_decisions.parquet")):
        for row in pq.read_table(file, columns=["key", "labels", "kept"]).to_pylist():
            decisions[row["key"]] = row
    asked, kept, images = [], [], []
    for shard in finished_shards(run / "raw"):
        for sample in iter_shard(run / "raw", shard):
            row = decisions[sample["__key__"]]
            asked.append([label in row["labels"] for label in unseen])
            kept.append(row["kept"])
            images.append(image_of(sample)[1])
    return np.array(asked, dtype=bool), np.array(kept, dtype=bool), images


def judged_shares(asked: np.ndarray, shows: np.ndarray) -> dict[str, Any]:
    """How many images, and the share the judge says show exactly / at least the labels asked for."""
    if not len(asked):
        return {"images": 0, "exact": None, "all_asked_shown": None}
    return {
        "images": len(asked),
        "exact": float((asked == shows).all(axis=1).mean()),
        "all_asked_shown": float((shows | ~asked).all(axis=1).mean()),
    }


def audit_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the audited seeds: the judge's test mAP, and per kept/dropped the shares the judge accepts."""

    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    out: dict[str, Any] = {"seeds": [r["seed"] for r in records]}
    out["judge_test_zsl_map"] = mean([r["judge_test_zsl_map"] for r in records])
    for side in ("kept", "dropped"):
        out[side] = {key: mean([r[side][key] for r in records]) for key in ("exact", "all_asked_shown")}
        out[side]["images"] = mean([r[side]["images"] for r in records])
    labels = records[0]["per_label"] if records else {}
    out["per_label"] = {
        label: {key: mean([r["per_label"][label][key] for r in records]) for key in labels[label]} for label in labels
    }
    return out


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def audit_table(summary: dict[str, Any]) -> str:
    """Markdown: the judge's verdict on kept vs dropped images, and per label."""
    lines = [
        f"\nFilter audit over seeds {', '.join(map(str, summary['seeds']))}: a linear probe on the teacher's "
        f"features, trained on the oracle images (test ZSL mAP {summary['judge_test_zsl_map']:.3f}), judges every "
        "generated image of the mlgen run.\n",
        "| images | per seed | judge: exactly the labels asked | judge: every asked label shown |",
        "|---|---|---|---|",
    ]
    for side in ("kept", "dropped"):
        entry = summary[side]
        lines.append(f"| {side} | {entry['images']:.0f} | {pct(entry['exact'])} | {pct(entry['all_asked_shown'])} |")
    lines += ["", "| label | kept share | judge shows it: kept | judge shows it: dropped |", "|---|---|---|---|"]
    for label, entry in summary["per_label"].items():
        lines.append(
            f"| {label} | {pct(entry['kept_share'])} | {pct(entry['judge_shows_kept'])} "
            f"| {pct(entry['judge_shows_dropped'])} |"
        )
    return "\n".join(lines) + "\n"
