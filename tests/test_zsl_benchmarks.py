"""The zero-shot benchmarks in their standard layouts: readers, bad input, and the papers' evaluation end to end
on miniature copies (tests/zsl_layouts.py) with the tiny models."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_GENERATE, mlgen
from mlgen.classifiers.benchmarks import open_split, parse_spec, shipped
from mlgen.classifiers.data import read_labelled
from mlgen.errors import MlgenError
from zsl_layouts import make_coco_zsl, make_nus_zsl, nus_names

COCO_SEEN, COCO_UNSEEN = shipped("coco_48_17_seen"), shipped("coco_48_17_unseen")
NUS_UNSEEN = shipped("nus_81_unseen")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {"coco-zsl": make_coco_zsl(root / "coco"), "nus-zsl": make_nus_zsl(root / "nus")}


def test_the_shipped_splits_are_the_papers() -> None:
    assert len(COCO_SEEN) == 48 and len(COCO_UNSEEN) == 17 and not set(COCO_SEEN) & set(COCO_UNSEEN)
    assert len(NUS_UNSEEN) == len(set(NUS_UNSEEN)) == 81
    assert {"airplane", "cake", "scissors"} <= set(COCO_UNSEEN) and {"airport", "zebra"} <= set(NUS_UNSEEN)


@pytest.mark.parametrize(
    ("benchmark", "split", "labels"),
    [
        ("coco-zsl", "seen-train", 48),
        ("coco-zsl", "unseen-test", 17),
        ("coco-zsl", "gzsl-test", 65),
        ("nus-zsl", "seen-train", 925),
        ("nus-zsl", "unseen-test", 81),
        ("nus-zsl", "gzsl-test", 1006),
    ],
)
def test_each_split_reads_its_images_with_the_labels_of_the_split(layouts, benchmark, split, labels) -> None:
    spec = f"{benchmark}:{layouts[benchmark]}:{split}"
    opened = open_split(parse_spec(spec))
    items = list(read_labelled(spec))
    assert len(opened.classes) == labels
    assert len(items) == 6  # COCO: the image without an annotation is not one of the split (official)
    assert all(item.image and item.labels and set(item.labels) <= set(opened.classes) for item in items)
    if split == "seen-train":
        assert not {x for item in items for x in item.labels} & set(opened.unseen)
    if split == "unseen-test":
        assert {x for item in items for x in item.labels} <= set(opened.unseen)


def test_nus_image_names_are_stripped_and_the_label_columns_are_all_labels_txt(layouts) -> None:
    root = layouts["nus-zsl"]
    targets = np.load(root / "annotations/zsl/formatted_val_gzsl_labels_filtered.npy")
    items = list(read_labelled(f"nus-zsl:{root}:gzsl-test"))
    names = nus_names()
    for row, item in zip(targets, items, strict=True):
        assert set(item.labels) == {names[c] for c in np.flatnonzero(row)}
        assert item.key.startswith("images/Flickr/") and item.key.endswith(".jpg")


def test_an_object_array_of_image_names_is_read_without_unpickling_code(tmp_path: Path) -> None:
    root = make_nus_zsl(tmp_path / "nus", images=3)
    path = root / "annotations/zsl/formatted_val_images_filtered.npy"
    names = np.load(path)
    np.save(path, names.astype(object), allow_pickle=True)
    keys = [item.key for item in read_labelled(f"nus-zsl:{root}:unseen-test")]
    assert keys == [f"images/{str(name).strip()}" for name in names]

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    np.save(path, np.array([Payload()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(MlgenError, match="will not unpickle"):
        read_labelled(f"nus-zsl:{root}:unseen-test")
    assert not (tmp_path / "ran").exists()


def _break(root: Path, how: str) -> str:
    """Break a copy of a layout; returns the file the error line must name."""
    coco = root / "annotations" / "instances_val2014_unseen_48_17.json"
    nus = root / "annotations" / "zsl"
    if how == "coco missing file":
        coco.unlink()
        return coco.name
    if how == "coco missing image":
        data = json.loads(coco.read_text())
        (root / "val2014" / data["images"][0]["file_name"]).unlink()
        return data["images"][0]["file_name"]
    if how == "coco classes":
        data = json.loads(coco.read_text())
        data["categories"][0]["name"] = "hot dog"  # a COCO class outside the 17 unseen
        coco.write_text(json.dumps(data))
        return coco.name
    if how == "nus row counts":
        images = nus / "formatted_val_images_filtered.npy"
        np.save(images, np.load(images)[:-1])
        return images.name
    if how == "nus missing image":
        name = str(np.load(nus / "formatted_val_images_filtered.npy")[0]).strip()
        (root / "images" / name).unlink()
        return Path(name).name
    if how == "nus classes":
        names = root / "annotations" / "Tag_all" / "all_labels.txt"
        names.write_text(names.read_text().replace("airport\n", "airports\n"))
        return names.name
    if how == "nus label shape":
        labels = nus / "formatted_val_all_labels_filtered.npy"
        np.save(labels, np.load(labels)[:, :81])
        return labels.name
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "coco missing file",
        "coco missing image",
        "coco classes",
        "nus row counts",
        "nus missing image",
        "nus classes",
        "nus label shape",
    ],
)
def test_a_broken_layout_is_one_line_naming_the_file_and_nothing_is_written(layouts, tmp_path, how) -> None:
    benchmark = how.split()[0] + "-zsl"
    root = tmp_path / "copy"
    shutil.copytree(layouts[benchmark], root)
    named = _break(root, how)
    (tmp_path / "run").mkdir()
    done = mlgen(
        "evaluate", "--run", tmp_path / "run", "--zero-shot", "clip", "--clip", "tiny", "--data", f"{benchmark}:{root}"
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("mlgen: error:"), done.stderr
    assert named in lines[0], lines[0]
    assert list((tmp_path / "run").iterdir()) == []


def test_specs_that_name_no_split_or_a_wrong_one_are_one_line(layouts, tmp_path) -> None:
    root = layouts["coco-zsl"]
    with pytest.raises(MlgenError, match="unknown split 'train'"):
        parse_spec(f"coco-zsl:{root}:train")
    with pytest.raises(MlgenError, match="name a split"):
        read_labelled(f"coco-zsl:{root}")
    with pytest.raises(MlgenError, match="folder not found"):
        read_labelled(f"nus-zsl:{tmp_path / 'none'}:gzsl-test")
    assert parse_spec(tmp_path / "labels.csv") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("benchmark", "unseen", "labels", "top_k"), [("coco-zsl", 17, 65, (3,)), ("nus-zsl", 81, 1006, (3, 5))]
)
def test_zero_shot_clip_on_a_benchmark_scores_zsl_and_gzsl_as_the_papers(
    layouts, tmp_path, benchmark, unseen, labels, top_k
) -> None:
    (tmp_path / "run").mkdir()
    done = mlgen(
        "evaluate",
        "--run",
        tmp_path / "run",
        "--zero-shot",
        "clip",
        "--clip",
        "tiny",
        "--data",
        f"{benchmark}:{layouts[benchmark]}",
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "zero-shot" / "clip" / "metrics.json").read_text())
    assert len(metrics["zsl"]["labels"]) == unseen and len(metrics["gzsl"]["labels"]) == labels
    assert set(metrics["zsl"]["labels"]) == set(NUS_UNSEEN if benchmark == "nus-zsl" else COCO_UNSEEN)
    for setting, split in (("zsl", "unseen-test"), ("gzsl", "gzsl-test")):
        assert metrics["settings"][setting]["split"] == split and metrics["settings"][setting]["images"] == 6
        assert all(f"f1@{k}" in metrics[setting] for k in top_k) and ("f1@5" in metrics[setting]) == (5 in top_k)
    assert ("f1@5" in done.stdout) == (5 in top_k)


def _run_with_unseen_labels(root: Path, labels: list[str]) -> Path:
    """A tiny-model run whose generated labels are ``labels``: one image per label (raw: no filter needed)."""
    (root / "classes.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    (root / "sets.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    run = root / "run"
    generate = [*FAST_GENERATE, "--model", "tiny", "--prompts-per-set", "1", "--images-per-prompt", "1"]
    for args in (
        [
            "prompts",
            "--classes",
            root / "classes.txt",
            "--llm",
            "template",
            "--label-sets",
            root / "sets.txt",
            "--prompts-per-set",
            "1",
        ],
        ["generate", *generate],
    ):
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    return run


@pytest.mark.slow
def test_train_on_coco_seen_train_then_evaluate_defaults_zsl_to_the_unseen_labels(layouts, tmp_path) -> None:
    root = layouts["coco-zsl"]
    run = _run_with_unseen_labels(tmp_path, COCO_UNSEEN)
    train = ["train-classifier", "--run", run, "--source", "raw", "--clip", "tiny", "--epochs", "1"]
    refused = mlgen(*train, "--seen-data", f"coco-zsl:{root}:seen-train")  # no validation images: which epoch?
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "--val-holdout" in lines[0], refused.stderr
    assert not (run / "classifier").exists()
    done = mlgen(
        "train-classifier",
        "--run",
        run,
        "--source",
        "raw",
        "--clip",
        "tiny",
        "--epochs",
        "1",
        "--seen-data",
        f"coco-zsl:{root}:seen-train",
        "--val-holdout",
        "0.34",
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((run / "classifier" / "config.json").read_text())
    assert sorted(config["seen_labels"]) == sorted(COCO_SEEN)
    # one split as plain labelled data, no --labels: ZSL over the labels the classifier saw no real image of
    done = mlgen("evaluate", "--run", run, "--data", f"coco-zsl:{root}:gzsl-test")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "classifier" / "metrics.json").read_text())
    assert metrics["zsl"]["labels"] == COCO_UNSEEN and len(metrics["gzsl"]["labels"]) == 65
    # the whole benchmark: the unseen test split for ZSL, the GZSL split for GZSL, and CLIP beside both
    done = mlgen("evaluate", "--run", run, "--data", f"coco-zsl:{root}")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "classifier" / "metrics.json").read_text())
    assert metrics["settings"]["zsl"]["split"] == "unseen-test" and len(metrics["gzsl"]["labels"]) == 65
    assert set(metrics["zero_shot_clip"]["zsl"]["labels"]) == set(COCO_UNSEEN)
    assert metrics["seen_images"] + metrics["seen_images_validation"] == 6
    assert metrics["seen_images_validation"] > 0 and metrics["seen_images_without_a_seen_label"] == 0


@pytest.mark.slow
def test_train_on_nus_seen_train_draws_100_seen_labels_per_real_batch_then_evaluate(layouts, tmp_path) -> None:
    root = layouts["nus-zsl"]
    seen_train = make_nus_zsl(tmp_path / "nus-all-negative", all_negative=2)  # 2 rows with no seen label
    run = _run_with_unseen_labels(tmp_path, NUS_UNSEEN[:4])  # a few unseen labels generated: fast
    done = mlgen(
        "train-classifier",
        "--run",
        run,
        "--source",
        "raw",
        "--clip",
        "tiny",
        "--epochs",
        "1",
        "--seen-data",
        f"nus-zsl:{seen_train}:seen-train",
        "--val-holdout",
        "0.34",
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "classifier" / "metrics.json").read_text())
    assert metrics["seen_classes_per_batch"] == 100  # every row kept, as official (a third held out to validate)
    assert metrics["seen_images"] + metrics["seen_images_validation"] == 6
    assert metrics["seen_images_without_a_seen_label"] == 2
    done = mlgen("evaluate", "--run", run, "--data", f"nus-zsl:{root}")
    assert done.returncode == 1 and "does not know 77 label(s) of nus-zsl" in done.stderr  # 81 - 4 generated
    done = mlgen("evaluate", "--run", run, "--data", f"nus-zsl:{root}:unseen-test")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "classifier" / "metrics.json").read_text())
    assert metrics["zsl"]["labels"] == NUS_UNSEEN[:4] and "f1@3" in metrics["zsl"]
