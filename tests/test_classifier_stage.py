"""The classifier stage on a tiny real run: it trains what ClassifierConfig says (head, fusion, loss), the
float16 feature cache is reused and changes nothing, real seen-label data joins in, a reloaded model predicts
exactly what the trained one did, 2 torchrun ranks train what 1 process does, and bad input is one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import FAST_GENERATE, mlgen
from mlgen.classifiers.model import load_trained, predict_images
from mlgen.classifiers.source import shard_samples
from mlgen.classifiers.stage import ClassifierStage
from mlgen.config import ClassifierConfig
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.world.render import render_dataset

CLASSES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """Tiny-model images of three shapes; a filter at threshold 1 keeps none of them (for the bad-input case)."""
    root = tmp_path_factory.mktemp("classifier-stage")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    run = root / "run"
    keep_none = ["filter", "--threshold", "1", "--gate", "0", "--min-keep", "0"]  # no gate nor fallback to refill
    for args in (["generate", "--classes", root / "classes.txt", *FAST_GENERATE], keep_none):
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    return RunDir(run)


def _train(run: RunDir, **settings) -> ClassifierStage:
    torch.manual_seed(0)
    shutil.rmtree(run.stage_dir("classifier"), ignore_errors=True)  # same settings would be "already done"
    stage = ClassifierStage(
        run, ClassifierConfig(**{"clip": "tiny", "source": "raw", "epochs": 2, "batch_size": 4, **settings})
    )
    run_stage(stage)
    return stage


def _images(run: RunDir, n: int = 5) -> list[bytes]:
    return [image for _, image in shard_samples(run.stage_dir("raw"))][:n]


@pytest.mark.parametrize(
    ("head", "fusion", "loss"),
    [("linear", False, "bce"), ("cprfl", False, "asl"), ("dualcoop", False, "mlcd"), ("linear", True, "asl")],
)
def test_stage_trains_the_configured_model_and_a_reload_predicts_the_same(tiny_run, head, fusion, loss) -> None:
    _train(tiny_run, head=head, fusion=fusion, loss=loss, epochs=0)  # the same seed: the weights it starts from
    folder = tiny_run.stage_dir("classifier")
    untrained = load_file(folder / "model.safetensors")
    stage = _train(tiny_run, head=head, fusion=fusion, loss=loss)
    config = json.loads((folder / "config.json").read_text())
    assert (config["head"], config["fusion"], config["loss"], config["clip"]) == (head, fusion, loss, "tiny")
    assert config["classes"] == CLASSES and config["thresholds"] == dict.fromkeys(CLASSES, 0.5)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (metrics["feature_cache"] is None) is fusion  # fused encoders train: nothing to cache
    assert metrics["final_loss"] == stage.fit_result.history[-1] and math.isfinite(metrics["final_loss"])
    images = len(list(shard_samples(tiny_run.stage_dir("raw"))))
    assert metrics["optimizer_steps"] == 2 * -(-images // 4)  # 2 epochs of batch 4, recorded
    saved = load_file(folder / "model.safetensors")
    assert any(k.startswith("head.") for k in saved)
    assert saved.keys() == untrained.keys()
    assert any(not torch.equal(saved[k], untrained[k]) for k in saved if k.startswith("head."))  # it trained
    assert any(k.startswith("visual.") for k in saved) is fusion  # the fusion modules train and are saved
    images = _images(tiny_run)
    expected = predict_images(stage.model, stage.preprocess, images)
    model, preprocess, _ = load_trained(folder)
    assert torch.equal(predict_images(model, preprocess, images), expected)


def test_feature_cache_is_float16_reused_and_changes_nothing(tiny_run) -> None:
    shutil.rmtree(tiny_run.root / "cache" / "classifier-features", ignore_errors=True)
    images = len([1 for _ in shard_samples(tiny_run.stage_dir("raw"))])
    folder = tiny_run.stage_dir("classifier")
    _train(tiny_run, head="linear", augment=False)  # augmented views are cached too (K per image)
    first = json.loads((folder / "metrics.json").read_text())["feature_cache"]
    weights = load_file(folder / "model.safetensors")
    assert first == {"hits": 0, "misses": images}
    _train(tiny_run, head="linear", augment=False)
    assert json.loads((folder / "metrics.json").read_text())["feature_cache"] == {"hits": images, "misses": 0}
    again = load_file(folder / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    files = list((tiny_run.root / "cache" / "classifier-features").rglob("*.safetensors"))
    assert files
    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.get_tensor("pooled").dtype == torch.float16
        assert len(json.loads(handle.metadata()["keys"])) == handle.get_tensor("pooled").shape[0]
    _train(tiny_run, head="linear", cache=False, augment=False)  # no cache: the same model up to float16 rounding
    uncached = load_file(folder / "model.safetensors")
    assert all(torch.allclose(weights[k], uncached[k], atol=2e-3) for k in weights)


@pytest.mark.parametrize("schedule", ["alternating", "mixed"])
def test_seen_data_joins_with_its_labels(tiny_run, tmp_path: Path, schedule: str) -> None:
    seen = render_dataset(tmp_path / "seen", n=6, seed=2, labels=["circle", "triangle", "heart"]) / "labels.csv"
    (seen.parent / "images" / "broken.png").write_bytes(b"not a png")
    with seen.open("a", encoding="utf-8") as handle:
        handle.write("images/broken.png,heart\n")
    _train(tiny_run, head="linear", seen_data=str(seen), schedule=schedule)
    folder = tiny_run.stage_dir("classifier")
    config = json.loads((folder / "config.json").read_text())
    extra = sorted({label for row in seen.read_text().splitlines()[1:] for label in row.split(",")[1].split("|")})
    assert config["classes"] == CLASSES + [label for label in extra if label not in CLASSES]
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = [row.split(",")[1].split("|") for row in seen.read_text().splitlines()[1:-1]]
    with_seen = sum(any(label not in CLASSES for label in row) for row in rows)  # circle alone: not a seen label
    assert 0 < with_seen < 6  # the rendered set has both kinds (else this test tests nothing)
    # every readable row is trained on, as the official loader: one without a seen label as an all-negative example
    assert metrics["seen_images"] == 6 and metrics["seen_images_without_a_seen_label"] == 6 - with_seen
    assert metrics["seen_images_skipped"] == 1


def test_no_kept_images_and_bad_settings_are_one_line(tiny_run) -> None:
    cases = {
        "0 images": ["train-classifier", "--run", tiny_run.root, "--overwrite"],
        "'head'": ["train-classifier", "--run", tiny_run.root, "--source", "raw", "--head", "mlp"],
        "seen-data not found": ["train-classifier", "--run", tiny_run.root, "--source", "raw", "--seen-data", "nope"],
    }
    for expected, args in cases.items():
        done = mlgen(*args)
        lines = [line for line in done.stderr.strip().splitlines() if "random weights" not in line]  # tiny loaded
        assert done.returncode == 1 and len(lines) == 1, (expected, done.stderr[-2000:])
        assert lines[0].startswith("mlgen: error:") and expected in lines[0], lines


@pytest.mark.slow
def test_two_torchrun_ranks_train_what_one_process_does(tiny_run, tmp_path: Path) -> None:
    """The whole stage under torchrun (gloo on CPU): each rank takes half of every global batch."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun
    trained = {}
    for name, launcher in (("one", [sys.executable]), ("two", [torchrun, "--standalone", "--nproc_per_node", "2"])):
        run = tmp_path / name
        shutil.copytree(tiny_run.root, run, ignore=shutil.ignore_patterns("classifier*", "cache"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLGEN_RUN": str(run)}  # torchrun would take --run as its own
        command = [*launcher, "-m", "mlgen", "train-classifier", "--source", "raw", "--epochs", "2"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        trained[name] = load_file(run / "classifier" / "model.safetensors")
    assert trained["one"].keys() == trained["two"].keys()
    for key in trained["one"]:
        assert torch.allclose(trained["one"][key], trained["two"][key], atol=1e-5, rtol=1e-4), key


@pytest.mark.slow  # ~35 s: five CLI runs, each loading torch and CLIP
def test_zero_shot_baselines_clip_and_s3(tiny_run, tmp_path: Path) -> None:
    real = render_dataset(tmp_path / "real", n=8, seed=4, labels=CLASSES) / "labels.csv"
    (tmp_path / "unseen.txt").write_text("circle\nstar\n", encoding="utf-8")
    for method in ("clip", "s3"):
        done = mlgen(
            "evaluate",
            "--run",
            tiny_run.root,
            "--data",
            real,
            "--zero-shot",
            method,
            "--clip",
            "tiny",
            "--labels",
            tmp_path / "unseen.txt",
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"{method} zero-shot, real images, ZSL" in done.stdout
        metrics = json.loads((tiny_run.root / "zero-shot" / method / "metrics.json").read_text())
        assert list(metrics["zsl"]["per_class_AP"]) == ["circle", "star"]
        assert list(metrics["gzsl"]["per_class_AP"]) == CLASSES and 0 <= metrics["gzsl"]["mAP"] <= 1
        assert metrics["images"] == 8 and "ap_rule" in metrics
    assert list(metrics["synonyms"]) == CLASSES and all(words[0] == c for c, words in metrics["synonyms"].items())
    done = mlgen("evaluate", "--run", tiny_run.root, "--data", real, "--zero-shot", "knn")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "mlgen: error: --zero-shot must be clip or s3, not 'knn'"
    ]
