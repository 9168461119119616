"""What the classifier trains generated images on: their TRAINING labels (the filtered sample json's ``labels``,
which the filter's topk rule makes differ from ``requested``), and with ``--soft-targets W`` the teacher's
probability x W on every other label. The filtered stage here is written by the real shard writer through the
stage runner, with hand-made labels and scores."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pytest
import torch
from PIL import Image

from mlgen.classifiers.source import multi_hot, shard_samples, synthetic_targets
from mlgen.classifiers.stage import ClassifierStage
from mlgen.config import ClassifierConfig, build_config
from mlgen.errors import MlgenError
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage, run_stage
from mlgen.shards.writer import MANIFEST_FIELDS, ShardWriter

CLASSES = ["circle", "square", "star", "heart"]
# (requested, training labels, the teacher's grouping-softmax probability of each class)
SAMPLES = [
    (["circle"], ["circle", "star"], [0.81, 0.05, 0.62, 0.12]),  # topk: star found beside the requested circle
    (["square", "heart"], ["square", "heart"], [0.07, 0.9, 0.2, 0.55]),
    (["star"], ["star"], [0.3, 0.1, 0.7, 0.4]),
    (["heart"], ["heart", "circle"], [0.58, 0.02, 0.04, 0.66]),
]
SCHEMA = pa.schema(
    [*MANIFEST_FIELDS, pa.field("requested", pa.list_(pa.string())), pa.field("scores", pa.list_(pa.float32()))]
)


@dataclass(frozen=True)
class Handmade:
    samples: int = len(SAMPLES)


class HandmadeFiltered(Stage):
    """A filtered stage with SAMPLES as its kept images (json as the filter writes it, plus ``requested``)."""

    name = "filtered"
    config_section = "filter"

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": 0}]

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        with ShardWriter(self.folder, 0, SCHEMA) as writer:
            for i, (requested, labels, scores) in enumerate(SAMPLES):
                png = io.BytesIO()
                Image.new("RGB", (32, 32), (60 * i, 255 - 60 * i, 128)).save(png, format="PNG")
                key, text = f"{i:09d}", f"a picture of {' and '.join(requested)}"
                meta = {"prompt_id": i, "set_id": i, "seed": i, "labels": labels, "requested": requested}
                meta["scores"] = dict(zip(CLASSES, scores, strict=True))
                row = {"key": key, "prompt_id": i, "set_id": i, "labels": labels, "text": text, "seed": i}
                row.update(requested=requested, scores=scores)
                writer.write({"__key__": key, "png": png.getvalue(), "txt": text, "json": meta}, row)
            return {"kept": writer.commit()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    root = tmp_path_factory.mktemp("soft") / "run"
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    run = RunDir(root)
    run_stage(HandmadeFiltered(run, Handmade()))
    return run


def _metas(run: RunDir) -> list[dict]:
    return [meta for meta, _ in shard_samples(run.stage_dir("filtered"))]


def test_targets_follow_the_training_labels_not_the_requested_ones(run: RunDir) -> None:
    metas = _metas(run)
    assert [m["requested"] for m in metas] == [s[0] for s in SAMPLES]  # the shard holds both, as written
    targets = synthetic_targets(metas, CLASSES, ClassifierConfig().soft_targets)  # the default: off
    assert torch.equal(targets, multi_hot([s[1] for s in SAMPLES], CLASSES))  # exactly the hard multi-hot
    assert targets[0].tolist() == [1, 0, 1, 0] and targets[3].tolist() == [1, 0, 0, 1]  # the topk extras are 1


def test_soft_targets_are_w_times_the_teacher_probability_off_the_training_labels(run: RunDir) -> None:
    targets = synthetic_targets(_metas(run), CLASSES, 0.5)
    for row, (requested, labels, scores) in zip(targets.tolist(), SAMPLES, strict=True):
        assert [row[CLASSES.index(label)] for label in requested] == [1.0] * len(requested)
        for label, target, score in zip(CLASSES, row, scores, strict=True):
            if label in labels:  # requested, or found by the teacher under topk: stays 1
                assert target == 1.0, (label, labels)
            else:  # W x score + (1 - W) x 0, in float32
                assert target == float(0.5 * torch.tensor(score)), (label, labels)


def test_soft_targets_without_teacher_scores_is_one_line() -> None:
    metas = [{"labels": ["circle"], "set_id": 0}]  # raw images carry no scores
    with pytest.raises(MlgenError, match="no teacher scores"):
        synthetic_targets(metas, CLASSES, 0.5)


@pytest.mark.parametrize(
    ("settings", "mentions", "a_user_setting"),
    [
        ({"source": "raw", "soft_targets": 0.5}, "--source raw", True),
        ({"source": "matched", "soft_targets": 0.5}, "--source matched", False),  # the experiment's raw subset
        ({"loss": "mlcd", "soft_targets": 0.5}, "mlcd", True),
    ],
)
def test_soft_targets_refused_where_they_cannot_apply(run: RunDir, settings: dict, mentions, a_user_setting) -> None:
    with pytest.raises(MlgenError, match="--soft-targets") as err:
        ClassifierStage(run, ClassifierConfig(**{"clip": "tiny", **settings}))  # a config built in code (the experiment's arms)
    assert mentions in str(err.value) and "\n" not in str(err.value)
    if a_user_setting:  # the command line and config file are refused before any stage is looked at
        with pytest.raises(MlgenError, match="--soft-targets"):
            build_config(ClassifierConfig, None, settings)


def test_soft_targets_outside_0_1_is_one_line() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(MlgenError, match="soft_targets"):
            build_config(ClassifierConfig, None, {"soft_targets": bad})


def _train(run: RunDir, soft: float, overwrite: bool = False) -> dict:
    config = ClassifierConfig(clip="tiny", epochs=1, batch_size=2, augment=False, cache=False, soft_targets=soft)
    run_stage(ClassifierStage(run, config), overwrite)
    return json.loads((run.stage_dir("classifier") / "metrics.json").read_text(encoding="utf-8"))


def test_the_stage_trains_on_soft_targets_and_a_changed_w_is_refused_on_resume(run: RunDir) -> None:
    shutil.rmtree(run.stage_dir("classifier"), ignore_errors=True)
    hard = _train(run, 0.0)
    with pytest.raises(MlgenError, match="soft_targets"):  # in the settings hash: finished work is not reused
        _train(run, 0.5)
    soft = _train(run, 0.5, overwrite=True)
    assert (hard["soft_targets"], soft["soft_targets"]) == ("off", 0.5)
    assert hard["train_images"] == soft["train_images"] == len(SAMPLES)
    assert soft["final_loss"] != hard["final_loss"]  # the same start and batches: only the targets differ


def test_seen_columns_without_a_teacher_score_stay_hard(run: RunDir) -> None:
    """A class the filter did not score (a seen label of --seen-data) gets 0 on a generated image."""
    targets = synthetic_targets(_metas(run), [*CLASSES, "kite"], 0.5)
    assert targets[:, -1].tolist() == [0.0] * len(SAMPLES)
