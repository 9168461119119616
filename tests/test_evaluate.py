"""Evaluation on real labelled images: the three formats, ZSL/GZSL metrics.json, sklearn's mAP, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from sklearn.metrics import average_precision_score

from conftest import FAST_GENERATE, mlgen
from mlgen.classifiers.data import read_labelled
from mlgen.classifiers.metrics import mean_average_precision, threshold_metrics
from mlgen.errors import MlgenError
from mlgen.world.render import render_dataset

SHAPES = ["circle", "square", "star"]


def test_map_matches_sklearn_and_leaves_out_classes_without_positives() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((50, 6))
    targets = (rng.random((50, 6)) < 0.3).astype(int)
    targets[:, 5] = 0  # no positive: left out
    expected = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(5)])
    assert mean_average_precision(scores, targets) == pytest.approx(expected)


def test_threshold_metrics_by_hand() -> None:
    probs = np.array([[0.9, 0.6, 0.1], [0.2, 0.7, 0.8]])
    targets = np.array([[1, 0, 0], [0, 1, 0]])
    m = threshold_metrics(probs, targets)
    assert m["OP"] == pytest.approx(2 / 4) and m["OR"] == pytest.approx(1.0)
    assert m["CP"] == pytest.approx((1 + 0.5 + 0) / 3) and m["CR"] == pytest.approx(1.0)


def _as_coco(csv_path: Path) -> Path:
    rows = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    names = sorted({label for row in rows for label in row["labels"].split("|")})
    coco = {
        "images": [{"id": i, "file_name": row["image"]} for i, row in enumerate(rows)],
        "categories": [{"id": 10 + c, "name": name} for c, name in enumerate(names)],
        "annotations": [
            {"image_id": i, "category_id": 10 + names.index(label)}
            for i, row in enumerate(rows)
            for label in row["labels"].split("|")
        ],
    }
    out = csv_path.parent / "coco.json"
    out.write_text(json.dumps(coco), encoding="utf-8")
    return out


def _as_webdataset(csv_path: Path) -> Path:
    out = csv_path.parent / "shards"
    out.mkdir()
    with wds.TarWriter(str(out / "00000.tar")) as sink:
        for i, row in enumerate(csv.DictReader(csv_path.open(encoding="utf-8"))):
            image = (csv_path.parent / row["image"]).read_bytes()
            sink.write({"__key__": f"{i:06d}", "png": image, "json": {"labels": row["labels"].split("|")}})
    return out


def test_the_three_formats_read_the_same_images_and_labels(tmp_path: Path) -> None:
    labels_csv = render_dataset(tmp_path / "real", n=6, seed=3) / "labels.csv"
    read = {
        fmt: list(read_labelled(path))
        for fmt, path in [("csv", labels_csv), ("coco", _as_coco(labels_csv)), ("wds", _as_webdataset(labels_csv))]
    }
    for items in read.values():
        assert [item.image for item in items] == [item.image for item in read["csv"]]
        assert [set(item.labels) for item in items] == [set(item.labels) for item in read["csv"]]
    assert all(item.labels for item in read["csv"]) and len(read["csv"]) == 6


def test_image_paths_may_not_leave_the_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image,labels\n../secret.png,circle\n", encoding="utf-8")
    with pytest.raises(MlgenError, match="outside"):
        list(read_labelled(tmp_path / "labels.csv"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-model run whose classifier knows three shape names (trained on raw/: no filter needed)."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n", encoding="utf-8")
    run = root / "run"
    steps = [
        ["generate", "--classes", root / "classes.txt", *FAST_GENERATE],
        ["filter"],
        ["train-classifier", "--source", "raw", "--epochs", "2"],
    ]
    for args in steps:
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    return run


@pytest.mark.slow
def test_evaluate_writes_zsl_gzsl_and_zero_shot_metrics(trained_run: Path, tmp_path: Path) -> None:
    labels_csv = render_dataset(tmp_path / "real", n=12, seed=5) / "labels.csv"
    with labels_csv.open("a", encoding="utf-8") as handle:  # one unreadable image: skipped and counted
        (labels_csv.parent / "images" / "broken.png").write_bytes(b"not a png")
        handle.write("images/broken.png,circle\n")
    (tmp_path / "unseen.txt").write_text("circle\nstar\n", encoding="utf-8")
    done = mlgen("evaluate", "--run", trained_run, "--data", labels_csv, "--labels", tmp_path / "unseen.txt")
    assert done.returncode == 0, done.stderr
    assert "ZSL" in done.stdout and "GZSL" in done.stdout and "does not know" in done.stdout
    metrics = json.loads((trained_run / "classifier" / "metrics.json").read_text())
    assert list(metrics["zsl"]["per_class_AP"]) == ["circle", "star"]
    assert list(metrics["gzsl"]["per_class_AP"]) == SHAPES
    for figures in (metrics["zsl"], metrics["gzsl"], metrics["zero_shot_clip"]["zsl"]):
        assert 0 <= figures["mAP"] <= 1 and "f1@3" in figures
    assert {"CP", "CR", "CF1", "OP", "OR", "OF1"} <= set(metrics["gzsl"])
    assert metrics["corrupt_images_skipped"] == 1 and metrics["images"] == 12
    assert "ap_rule" in metrics and "optimizer_steps" in metrics  # evaluate keeps the training figures
    assert set(metrics["unknown_labels"]) <= {"triangle", "cross", "ring", "diamond", "heart"}
    assert (trained_run / "classifier" / "plots" / "per_class_ap.png").stat().st_size > 1000
    # The same images as a COCO file give the same figures.
    done = mlgen("evaluate", "--run", trained_run, "--data", _as_coco(labels_csv), "--labels", tmp_path / "unseen.txt")
    assert done.returncode == 0, done.stderr
    again = json.loads((trained_run / "classifier" / "metrics.json").read_text())
    assert again["gzsl"]["mAP"] == pytest.approx(metrics["gzsl"]["mAP"])


@pytest.mark.slow
def test_evaluate_bad_input_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "other.csv").write_text("image,labels\nx.png,zebra\n", encoding="utf-8")
    render_dataset(tmp_path / "d", n=2, seed=1)
    (tmp_path / "d" / "zebra.csv").write_text(
        "image,labels\n" + "".join(f"{p.relative_to(tmp_path / 'd')},zebra\n" for p in (tmp_path / "d").rglob("*.png")),
        encoding="utf-8",
    )
    (tmp_path / "unseen.txt").write_text("zebra\ncircle\n", encoding="utf-8")
    cases = {
        "not found": ["--data", tmp_path / "missing.csv"],
        "labels differ": ["--data", tmp_path / "d" / "zebra.csv"],
        "not trained on": ["--data", tmp_path / "d" / "labels.csv", "--labels", tmp_path / "unseen.txt"],
    }
    for expected, args in cases.items():
        done = mlgen("evaluate", "--run", trained_run, *args)
        assert done.returncode == 1, (expected, done.stdout, done.stderr)
        lines = [line for line in done.stderr.strip().splitlines() if "random weights" not in line]  # tiny loaded
        assert len(lines) == 1 and lines[0].startswith("mlgen: error:") and expected in lines[0], lines
