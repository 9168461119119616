"""``mlgen experiment``: equal optimizer steps, paired intervals, failed arms reported, kill -9 resume, the
demo's mlgen arm above chance, and bad input in one line. Tiny models and a few rendered images (fast)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats  # a hard dependency (paired_p): its tests never skip

from conftest import mlgen
from mlgen.config import ClassifierConfig, ExperimentConfig
from mlgen.experiment import run_experiment
from mlgen.experiment.audit import judged_shares
from mlgen.experiment.stats import mean_interval, paired_interval, t_quantile, verdict
from mlgen.world.render import render_dataset

UNSEEN = "circle,triangle"
TINY_CLASSIFIER = ClassifierConfig(head="dualcoop", dualcoop_scoring="pooled", batch_size=8, augment_views=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A user's own data, rendered: a test set of four shapes, seen-label and oracle (unseen-label) images."""
    root = tmp_path_factory.mktemp("data")
    sets = {
        "data": (24, None, "test"),
        "seen_data": (16, ["square", "star"], "seen"),
        "oracle_data": (12, None, "oracle"),
        "val_data": (16, None, "val"),
    }
    out = {}
    for name, (n, labels, stream) in sets.items():
        labels = labels or (
            ["circle", "triangle"] if name == "oracle_data" else ["circle", "triangle", "square", "star"]
        )
        render_dataset(root / name, n, 0, labels, size=32, stream=stream)
        out[name] = str(root / name / "labels.csv")
    return out


def tiny(data: dict[str, str], **changes) -> ExperimentConfig:
    """The user-data path on the tiny models: every stage in seconds."""
    values = dict(
        world=None,
        unseen=UNSEEN,
        clip="tiny",
        model="tiny",
        llm="template",
        prompts_per_set=1,
        images_per_prompt=2,
        generate_steps=2,
        epochs=3,
        pass_steps=2,
        finetune_steps=1,
        seeds=2,
        **data,
    )
    return ExperimentConfig(**{**values, **changes})


def cells(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "experiment" / "cells").rglob("*.json"))]


def test_every_trained_arm_takes_the_same_steps_per_pass_kind(tmp_path: Path, data) -> None:
    """Equal real and synthetic steps whatever each arm's image count; seen-only has only its real pass."""
    arms = "seen-only,paper,text-embedding-head,mlgen,no-filter,no-filter-matched,paper-filter,mlgen-uncached,+fusion"
    arms += ",oracle"
    config = tiny(data, seeds=1, arms=arms, epochs=4, pass_steps=3, images_per_prompt=4)
    run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    done = {c["arm"]: c for c in cells(tmp_path)}
    assert set(done) == set(arms.split(","))
    failed = {arm: c.get("error") for arm, c in done.items() if c["status"] != "ok"}
    assert not failed, failed
    two_pass = {arm: (c["real_steps"], c["synthetic_steps"]) for arm, c in done.items() if arm != "seen-only"}
    assert two_pass == dict.fromkeys(two_pass, (12, 12))
    assert (done["seen-only"]["real_steps"], done["seen-only"]["synthetic_steps"]) == (12, 0)
    images = {arm: done[arm]["images"] for arm in ("mlgen", "no-filter", "no-filter-matched", "paper-filter")}
    # steps equal, images not (the tiny CLIP reads no label: the default gate keeps all, the COCO rule drops some)
    assert images["no-filter"] > images["paper-filter"] and images["mlgen"] == images["no-filter-matched"], images
    rows = list(csv.DictReader((tmp_path / "experiment" / "results.csv").open()))
    assert len(rows) == 2 * len(done)  # zsl and gzsl per cell
    mlgen_row = next(r for r in rows if r["arm"] == "mlgen")
    assert mlgen_row["real_steps"] == mlgen_row["synthetic_steps"] == "12" and mlgen_row["selected_epoch"] != ""
    assert sum(int(part.split(":")[1]) for part in mlgen_row["images_per_label"].split("|")) >= images["mlgen"]
    # the filter's share beside every arm that trains on a filter's choice, empty for the others
    by_arm = {r["arm"]: r for r in rows if r["setting"] == "zsl"}
    filtered = {"paper", "mlgen", "paper-filter", "mlgen-uncached", "+fusion"}
    assert {arm for arm, r in by_arm.items() if r["kept_share"] != ""} == filtered
    assert {arm for arm, r in by_arm.items() if r["gated"] != ""} == filtered
    generated = images["no-filter"]
    for arm in ("mlgen", "paper-filter"):
        assert float(by_arm[arm]["kept_share"]) == pytest.approx(images[arm] / generated, abs=1e-4)
    table = (tmp_path / "experiment" / "table.md").read_text()
    assert "| kept share | gated (seeds) |" in table
    assert f"| {images['paper-filter'] / generated:.3f} |" in table


def test_matched_control_draws_as_many_raw_images_per_label_set_as_the_filter_kept(tmp_path: Path, data) -> None:
    from collections import Counter

    from mlgen.classifiers.source import shard_samples

    config = tiny(data, seeds=1, arms="no-filter-matched", images_per_prompt=6, prompts_per_set=2)
    run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    run = tmp_path / "experiment" / "runs" / "0" / "mlgen"
    per_set = {name: Counter(m["set_id"] for m, _ in shard_samples(run / name)) for name in ("filtered", "matched")}
    assert sum(per_set["filtered"].values()) > 0 and per_set["matched"] == per_set["filtered"]
    raw = {m["seed"]: image for m, image in shard_samples(run / "raw")}  # an image's seed is its identity
    matched = [(m["seed"], image) for m, image in shard_samples(run / "matched")]
    assert len({seed for seed, _ in matched}) == len(matched)  # no image twice
    assert all(raw[seed] == image for seed, image in matched)  # each one a raw image, unchanged


def test_soft_arm_is_mlgen_on_soft_targets(tmp_path: Path, data) -> None:
    """``soft`` trains the seed's mlgen run (the same images and steps) with --soft-targets 0.5; mlgen stays hard."""
    run_experiment(tmp_path, tiny(data, seeds=1, arms="mlgen,soft"), TINY_CLASSIFIER, log=lambda _: None)
    done = {c["arm"]: c for c in cells(tmp_path)}
    assert {arm: c["status"] for arm, c in done.items()} == {"mlgen": "ok", "soft": "ok"}, done
    run = tmp_path / "experiment" / "runs" / "0" / "mlgen"
    metrics = {
        name: json.loads((run / name / "metrics.json").read_text()) for name in ("classifier", "classifier-soft")
    }
    assert (metrics["classifier"]["soft_targets"], metrics["classifier-soft"]["soft_targets"]) == ("off", 0.5)
    same = ("images", "real_steps", "synthetic_steps", "images_per_label")
    assert [done["soft"][k] for k in same] == [done["mlgen"][k] for k in same]


def test_seeds_in_two_worker_processes_give_the_one_process_figures(tmp_path: Path, data) -> None:
    arms = "zero-shot,mlgen,oracle"
    scores = {}
    for workers in (1, 2):
        run = tmp_path / f"workers-{workers}"
        run_experiment(run, tiny(data, arms=arms, workers=workers), TINY_CLASSIFIER, log=lambda _: None)
        scores[workers] = {(c["seed"], c["arm"]): (c["status"], c["zsl"], c["gzsl"], c["images"]) for c in cells(run)}
    assert len(scores[1]) == 6 and all(v[0] == "ok" for v in scores[1].values()), scores[1]
    assert scores[2] == scores[1]
    for seed in (0, 1):  # the filter audit judged every generated image, kept and dropped
        run = tmp_path / "workers-2" / "experiment" / "runs" / str(seed) / "mlgen"
        audit = json.loads((tmp_path / "workers-2" / "experiment" / "audit" / f"{seed}.json").read_text())
        kept = sum(pq.read_metadata(p).num_rows for p in (run / "filtered").glob("0*[0-9].parquet"))
        generated = sum(pq.read_metadata(p).num_rows for p in (run / "raw").glob("0*[0-9].parquet"))
        assert (audit["kept"]["images"], audit["dropped"]["images"]) == (kept, generated - kept)
    assert "Filter audit over seeds 0, 1" in (tmp_path / "workers-2" / "experiment" / "table.md").read_text()


def test_selection_reads_validation_images_never_test_images(tmp_path: Path, data, monkeypatch) -> None:
    """Model selection (and training) read the validation and seen sets; the test set is read only to score."""
    import mlgen.classifiers.stage as stage_module

    read: list[str] = []
    original = stage_module.labelled_samples

    def recording(path, *folders):
        read.append(str(Path(path).resolve()))
        return original(path, *folders)

    monkeypatch.setattr(stage_module, "labelled_samples", recording)
    config = tiny(data, seeds=1, arms="mlgen,oracle", workers=1)
    run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    assert str(Path(data["val_data"]).resolve()) in read
    assert str(Path(data["data"]).resolve()) not in read, read
    assert all(c["selected_epoch"] is not None for c in cells(tmp_path))


def test_holm_adjusts_step_down_and_verdicts_follow_the_adjusted_p() -> None:
    from mlgen.experiment.stats import holm, holm_verdict, paired_p

    assert holm([0.01, 0.04, 0.03, float("nan")]) == pytest.approx([0.03, 0.06, 0.06, float("nan")], nan_ok=True)
    arm, ref = {s: 0.70 + 0.01 * (s % 3) for s in range(10)}, {s: 0.68 for s in range(10)}
    p = paired_p(arm, ref)
    assert p == pytest.approx(stats.ttest_rel(list(arm.values()), list(ref.values())).pvalue)
    interval = paired_interval(arm, ref)
    assert holm_verdict(interval, 0.03) == "holds (above mlgen)"
    assert holm_verdict(interval, 0.06) == "not shown"  # significant raw, not after the correction


def test_audit_shares_on_known_verdicts() -> None:
    asked = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    shows = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=bool)
    assert judged_shares(asked, shows) == {"images": 4, "exact": 0.5, "all_asked_shown": 0.75}
    assert judged_shares(asked[:0], shows[:0])["exact"] is None


def test_paired_interval_matches_student_t() -> None:
    arm = {0: 0.71, 1: 0.64, 2: 0.69, 3: 0.80}
    ref = {0: 0.60, 1: 0.62, 2: 0.61, 3: 0.66, 9: 0.1}  # seed 9 has no partner: left out of the pairs
    diffs = np.array([0.11, 0.02, 0.08, 0.14])
    half = 3.182446 * diffs.std(ddof=1) / 2  # t(0.975, 3) * s / sqrt(4)
    interval = paired_interval(arm, ref)
    assert interval.n == 4
    assert interval.mean == pytest.approx(diffs.mean())
    assert (interval.low, interval.high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert verdict(interval).startswith("holds")
    assert verdict(mean_interval([0.1, -0.1, 0.05])) == "not shown"
    for df in (1, 2, 5, 9, 19, 21, 40, 200):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=5e-4)


def test_a_failed_arm_is_reported_for_each_seed_never_dropped(tmp_path: Path, data) -> None:
    config = tiny(data, arms="zero-shot,oracle", oracle_data=None)  # the oracle needs --oracle-data
    summary = run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    rows = list(csv.DictReader((tmp_path / "experiment" / "results.csv").open()))
    oracle = [r for r in rows if r["arm"] == "oracle"]
    assert [(r["seed"], r["status"]) for r in oracle] == [
        ("0", "failed"),
        ("0", "failed"),
        ("1", "failed"),
        ("1", "failed"),
    ]
    assert "oracle-data" in oracle[0]["error"]
    assert summary["zsl"]["oracle"]["failed_seeds"] == [0, 1]
    assert "| oracle | failed" in (tmp_path / "experiment" / "table.md").read_text()
    assert summary["zsl"]["zero-shot"]["seeds_ok"] == 2


def _experiment_args(run: Path, data: dict[str, str], arms: str) -> list[str]:
    args = ["experiment", "--run", str(run), "--world", "none", "--unseen", UNSEEN, "--clip", "tiny", "--model", "tiny"]
    args += ["--llm", "template", "--arms", arms, "--seeds", "2", "--epochs", "3", "--pass-steps", "2"]
    return [*args, "--data", data["data"], "--seen-data", data["seen_data"], "--oracle-data", data["oracle_data"]]


def test_resumes_after_kill_9_without_redoing_finished_cells(tmp_path: Path, data) -> None:
    config = tmp_path / "mlgen.yaml"
    config.write_text(
        "classifier:\n  head: dualcoop\n  dualcoop_scoring: pooled\n  batch_size: 8\n  augment_views: 2\n"
    )
    args = [*_experiment_args(tmp_path / "R", data, "zero-shot,oracle,seen-only"), "--config", str(config)]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlgen", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    cell_dir = tmp_path / "R" / "experiment" / "cells"
    deadline = time.time() + 240
    while len(list(cell_dir.rglob("*.json"))) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in cell_dir.rglob("*.json")}
    assert 2 <= len(finished) < 6, "kill -9 came too late to test a resume"
    second = mlgen(*args, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    done = [line for line in second.stdout.splitlines() if line.startswith("seed ")]
    assert len(done) == 6 - len(finished)  # only the missing cells ran
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert len(list(cell_dir.rglob("*.json"))) == 6


def label_frequency_map(targets: np.ndarray) -> float:
    """Chance: every image scored by the labels' training frequency (a constant per class): AP = prevalence."""
    return float(targets.mean(axis=0)[targets.any(axis=0)].mean())


def test_demo_mlgen_arm_beats_chance(tmp_path: Path) -> None:
    """The demo's pipeline teaches its head the unseen labels from the generated images alone.

    The shared head starts from the teacher's text embeddings (its zero-shot classifier), so a trainer that did
    nothing would already beat chance: the head here starts from random weights (the rate tuned for that start)
    and must learn everything it knows of the unseen labels from the images.
    """
    from mlgen.demo import demo_settings
    from mlgen.experiment.cells import TestSet
    from mlgen.experiment.data import resolve, test_set
    from mlgen.experiment.runner import DEFAULT_CLASSIFIER

    settings = demo_settings("template", world="toy")
    small = dict(prompts_per_set=1, images_per_prompt=4, epochs=6, test_images=120, seen_images=64, oracle_images=32)
    settings = ExperimentConfig(**{**settings.__dict__, **small, "arms": "mlgen", "val_images": 60})
    random_start = dataclasses.replace(DEFAULT_CLASSIFIER, head_init="random", lr=1e-3)
    summary = run_experiment(tmp_path, settings, random_start, log=lambda _: None)
    setup = resolve(settings)
    test = TestSet.load(test_set(settings, setup, tmp_path / "experiment", 0), setup)
    zsl_rows = test.targets[:, : test.unseen].any(axis=1)
    chance = label_frequency_map(test.targets[zsl_rows][:, : test.unseen])
    assert summary["zsl"]["mlgen"]["mAP"]["mean"] >= chance + 0.2, (summary["zsl"]["mlgen"], chance)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--arms", "mlgen,nonsense"], "unknown arm 'nonsense'"),
        (["--unseen", "circle,blob"], "'blob' is not in the toy world"),
        (["--seeds", "0"], "'seeds' must be a positive number"),
        (["--seen", "circle,square"], "'circle' is listed as both seen and unseen"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, change: list[str], message: str) -> None:
    args = ["experiment", "--run", str(tmp_path / "R"), "--world", "toy-classic", "--unseen", "circle,triangle"]
    result = mlgen(*args, *change, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlgen: error:") and message in lines[0], result.stderr
    assert not (tmp_path / "R" / "experiment" / "cells").exists()


def test_splits_are_drawn_anew_each_in_its_own_folder(tmp_path: Path) -> None:
    from mlgen.experiment.runner import split_labels

    small = dict(test_images=24, val_images=16, seen_images=16, oracle_images=12, prompts_per_set=1)
    config = ExperimentConfig(
        world="toy-classic", unseen="circle,star", clip="tiny", model="tiny", llm="template", seeds=1, splits=3,
        arms="zero-shot,oracle", epochs=2, pass_steps=2, **small,
    )  # fmt: skip
    splits = split_labels(config)
    assert splits[0] == ["circle", "star"] and len({frozenset(s) for s in splits}) == 3
    assert all(len(s) == 2 for s in splits) and split_labels(config) == splits  # seeded: the same every time
    summary = run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    for number, unseen in enumerate(splits[1:], start=1):
        classes = (
            tmp_path / "experiment" / "splits" / str(number) / "runs" / "0" / "oracle" / "classes.txt"
        ).read_text()
        assert classes.split() == unseen
    assert summary["pooled"]["zsl"]["oracle"]["seeds_ok"] == 1  # the seed is the unit, whatever the splits
    report = (tmp_path / "experiment" / "splits.md").read_text()
    assert all(", ".join(s) in report for s in splits) and "the seed as the unit (n = 1 seeds" in report
    assert json.loads((tmp_path / "experiment" / "splits.json").read_text())["n"] == 1


def test_pooled_differences_take_the_seed_as_the_unit() -> None:
    """A seed's splits share its scenes: pooled over splits, each seed's difference is averaged over its splits
    first, and the interval has seeds - 1 degrees of freedom (not one observation per (split, seed) pair)."""
    import tempfile

    from mlgen.experiment.arms import select_arms
    from mlgen.experiment.report import write_pooled_report

    noise = {(0, 0): 0.03, (1, 0): -0.03, (0, 1): 0.0, (1, 1): 0.02, (0, 2): -0.01, (1, 2): 0.0}
    cells_ = [
        {"split": k, "seed": s, "arm": arm, "status": "ok", "zsl": {"mAP": m, "f1@3": 0}, "gzsl": {"mAP": m, "f1@3": 0}}
        for k in range(2)
        for s in range(10, 13)
        for arm, m in (("zero-shot", 0.5 + 0.1 * k), ("mlgen", 0.6 + 0.1 * k + 0.01 * s + noise[k, s - 10]))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        pooled = write_pooled_report(Path(tmp), cells_, select_arms("zero-shot,mlgen"), [["a"], ["b"]], [10, 11, 12])
        record = json.loads((Path(tmp) / "splits.json").read_text())
    assert record["n"] == 3 and record["seed_list"] == [10, 11, 12]
    (comparison,) = pooled["zsl"]["comparisons"]
    assert (comparison["arm"], comparison["reference"], comparison["paired_seeds"]) == ("zero-shot", "mlgen", 3)
    per_seed = [-(0.1 + 0.01 * s + (noise[0, s - 10] + noise[1, s - 10]) / 2) for s in range(10, 13)]
    expected = mean_interval(per_seed)  # t with 2 degrees of freedom over the seeds' split means
    assert comparison["n"] == 3
    assert (comparison["mean"], comparison["low"], comparison["high"]) == pytest.approx(
        (expected.mean, expected.low, expected.high), abs=1e-4
    )


@pytest.mark.slow
def test_finetune_best_arm_fine_tunes_on_the_aliases_filters_best_names(tmp_path: Path) -> None:
    """``+finetune-best`` is ``+finetune`` whose CLIP-score loss reads each label's best name from the seed's
    ``+aliases`` filter (``finetune --names-from`` its reliability.json); the toy-headroom teacher reads hearts
    only as "love symbol", so that is heart's best name there."""
    from mlgen.finetune.names import best_name_setting, read_best_names

    small = dict(test_images=24, val_images=16, seen_images=16, oracle_images=12, prompts_per_set=1)
    config = ExperimentConfig(
        world="toy", unseen="circle,triangle,star,heart", seeds=1, arms="+finetune,+finetune-best", llm="template",
        images_per_prompt=4, epochs=2, pass_steps=2, finetune_steps=1, **small,
    )  # fmt: skip
    run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    assert {c["arm"]: c["status"] for c in cells(tmp_path)} == {"+finetune": "ok", "+finetune-best": "ok"}
    runs = tmp_path / "experiment" / "runs" / "0"
    best = read_best_names(runs / "aliases" / "filtered" / "reliability.json", config.unseen.split(","))
    assert best["heart"] == "love symbol", best
    tuned = json.loads((runs / "finetune-best" / "finetune" / "plan.json").read_text())["settings"]
    assert tuned["best_names"] == best_name_setting(best)
    plain = json.loads((runs / "finetune" / "finetune" / "plan.json").read_text())["settings"]
    assert "best_names" not in plain


def _shipped_with(folder: Path, name: str = "toy-headroom-2") -> tuple:
    """The built-in models, with ``name``'s generator read from ``folder``."""
    from mlgen.models.builtin import BUILTIN_MODELS

    return tuple(
        dataclasses.replace(m, folder=folder) if (m.name, m.kind) == (name, "diffusion") else m for m in BUILTIN_MODELS
    )


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ("the world's generator", "resolved_model"),
        ("the generator's weights", "resolved_model"),
        ("the world's paper rate", "resolved_paper_lr"),
    ],
)
def test_an_experiment_made_with_other_models_under_the_same_names_is_refused(
    tmp_path: Path, monkeypatch, change: str, setting: str
) -> None:
    """An upgrade that maps --world toy to another generator, ships new weights under the old name, or chooses
    another paper rate for the world must not add cells to an experiment made with the old one (the settings
    record the world, not what it resolves to)."""
    import shutil

    from mlgen.errors import MlgenError
    from mlgen.experiment import cells
    from mlgen.experiment import data as experiment_data
    from mlgen.models import builtin

    shipped = builtin.builtin("toy-headroom-2", "diffusion")
    copy = tmp_path / "weights"
    shutil.copytree(shipped.folder, copy)
    monkeypatch.setattr(builtin, "BUILTIN_MODELS", _shipped_with(copy))
    config = ExperimentConfig(
        world="toy", unseen=UNSEEN, seeds=1, arms="zero-shot", test_images=16, val_images=8, seen_images=8,
        oracle_images=8, llm="template", workers=1,
    )  # fmt: skip
    run = tmp_path / "R"
    run_experiment(run, config, log=lambda _: None)
    run_experiment(run, config, log=lambda _: None)  # the same models: accepted
    if change == "the world's generator":
        monkeypatch.setitem(experiment_data.WORLDS, "toy", ("headroom", "toy-headroom", "toy-headroom"))
    elif change == "the generator's weights":
        weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    else:
        monkeypatch.setitem(cells.PAPER_LR, "toy", 0.2)
    with pytest.raises(MlgenError, match=f"setting '{setting}' differs"):
        run_experiment(run, config, log=lambda _: None)
    settings = run / "experiment" / "settings.json"
    recorded = json.loads(settings.read_text())
    assert recorded["resolved_model"].startswith("toy-headroom-2 (weights ")
    del recorded["resolved_model"]  # an experiment recorded before the models were
    settings.write_text(json.dumps(recorded))
    with pytest.raises(MlgenError, match="older mlgen"):
        run_experiment(run, config, log=lambda _: None)


def test_first_seed_runs_only_its_seeds_and_a_dir_holds_one_range(tmp_path: Path) -> None:
    """``--first-seed 20 --seeds 2``: seeds 20 and 21 only, each drawing its own scenes (seed 20's test set is the
    ``test`` stream's seed 20); the range is a recorded setting, so the DIR refuses another."""
    from mlgen.errors import MlgenError

    small = dict(test_images=24, val_images=16, seen_images=16, oracle_images=12, prompts_per_set=1)
    config = ExperimentConfig(
        world="toy-classic", unseen="circle,star", clip="tiny", model="tiny", llm="template", seeds=2,
        first_seed=20, arms="zero-shot,oracle", epochs=2, pass_steps=2, workers=1, **small,
    )  # fmt: skip
    summary = run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    root = tmp_path / "experiment"
    assert sorted(p.name for p in (root / "cells").iterdir()) == ["20", "21"]
    assert {p.name.split("-")[-1] for p in (root / "data").iterdir()} == {"20", "21"}
    with (root / "results.csv").open() as handle:
        assert {int(row["seed"]) for row in csv.DictReader(handle)} == {20, 21}
    assert summary["seed_list"] == [20, 21] and summary["zsl"]["oracle"]["seeds_ok"] == 2
    from mlgen.world.render import SHAPES

    classes = ["circle", "star", *sorted(c for c in SHAPES if c not in ("circle", "star"))]
    render_dataset(tmp_path / "expected", 24, 20, classes, world="classic", stream="test")
    assert (root / "data" / "test-20" / "labels.csv").read_text() == (tmp_path / "expected" / "labels.csv").read_text()
    with pytest.raises(MlgenError, match="setting 'first_seed' differs"):
        run_experiment(tmp_path, dataclasses.replace(config, first_seed=0), TINY_CLASSIFIER, log=lambda _: None)


def test_probe_arm_trains_on_every_label_for_its_own_budget_and_the_gap_has_an_interval(tmp_path: Path) -> None:
    """The probe (the ceiling) trains on real scenes of every label from the ``probe`` stream, for ``probe_epochs``
    (not the arms' budget), and the gap closed is reported against the oracle and the probe, each with an
    interval over seeds."""
    small = dict(test_images=24, val_images=16, seen_images=16, oracle_images=12, probe_images=20, prompts_per_set=1)
    config = ExperimentConfig(
        world="toy-classic", unseen="circle,star", clip="tiny", model="tiny", llm="template", seeds=2,
        arms="zero-shot,mlgen,oracle,probe", epochs=2, pass_steps=2, probe_epochs=5, images_per_prompt=2,
        generate_steps=2, workers=1, **small,
    )  # fmt: skip
    summary = run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    probes = [c for c in cells(tmp_path) if c["arm"] == "probe"]
    assert [c["status"] for c in probes] == ["ok", "ok"], probes
    assert all(c["steps"] == 5 * 2 and c["real_steps"] == 10 for c in probes)  # its own budget, one real pass
    classes = (tmp_path / "experiment" / "runs" / "0" / "probe" / "classes.txt").read_text().split()
    assert classes[:2] == ["circle", "star"] and len(classes) == 8  # every label of the world
    assert (tmp_path / "experiment" / "data" / "probe-0" / "labels.csv").is_file()
    for key in ("gap_closed", "gap_closed_probe"):
        gap = summary["zsl"][key]
        assert gap["seeds"] == 2 and set(gap) >= {"value", "low", "high", "per_seed"}, gap
    assert "(probe - zero-shot)" in (tmp_path / "experiment" / "table.md").read_text()


def test_gap_closed_interval_is_a_bootstrap_over_seeds() -> None:
    from mlgen.experiment.report import _gap

    values = {"zero-shot": [0.60, 0.62, 0.58, 0.61, 0.59], "mlgen": [0.70, 0.75, 0.66, 0.72, 0.69]}
    values["oracle"] = [0.80, 0.79, 0.81, 0.83, 0.78]
    cells_ = [
        {"seed": s, "arm": arm, "status": "ok", "zsl": {"mAP": v[i], "f1@3": 0}}
        for arm, v in values.items()
        for i, s in enumerate(range(10, 15))
    ]
    gap = _gap(cells_, "zsl", "oracle")
    means = {arm: np.mean(v) for arm, v in values.items()}
    assert gap["value"] == pytest.approx(
        (means["mlgen"] - means["zero-shot"]) / (means["oracle"] - means["zero-shot"]), abs=1e-4
    )
    assert gap["low"] < gap["value"] < gap["high"] and gap["seeds"] == 5
    rng = np.random.default_rng(0)
    table_ = np.array([values[a] for a in ("mlgen", "zero-shot", "oracle")]).T
    draws = table_[rng.integers(0, 5, size=(2000, 5))].mean(1)
    ratios = (draws[:, 0] - draws[:, 1]) / (draws[:, 2] - draws[:, 1])
    assert (gap["low"], gap["high"]) == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])), abs=1e-4)
    assert gap["high"] - gap["low"] > 0.05  # the seeds disagree: the interval is not a point


def test_every_arm_selects_its_epoch_on_the_unseen_labels_validation_map(tmp_path: Path, data) -> None:
    """One selection metric for every arm: the unseen labels' mAP on the validation images that hold one, seen-only
    included (its shared context scores the unseen names it never trained on)."""
    import torch

    from mlgen.classifiers.data import squash_transform
    from mlgen.classifiers.metrics import evaluate_scores
    from mlgen.classifiers.model import load_classifier, load_clip, read_config
    from mlgen.classifiers.predict import predict_logits
    from mlgen.classifiers.source import labelled_samples, multi_hot

    config = tiny(data, seeds=1, arms="seen-only,mlgen", epochs=4, pass_steps=2)
    run_experiment(tmp_path, config, TINY_CLASSIFIER, log=lambda _: None)
    assert {c["arm"]: c["status"] for c in cells(tmp_path)} == {"seen-only": "ok", "mlgen": "ok"}
    unseen = UNSEEN.split(",")
    labels, images, _ = labelled_samples(Path(data["val_data"]))
    rows = [i for i, row in enumerate(labels) if any(label in unseen for label in row)]
    truth = multi_hot([labels[i] for i in rows], unseen).numpy()
    held = [image for i, image in enumerate(images()) if i in set(rows)]
    for arm in ("seen-only", "mlgen"):
        folder = tmp_path / "experiment" / "runs" / "0" / arm / "classifier"
        assert json.loads((folder / "plan.json").read_text())["settings"]["val_labels"] == unseen
        clip_model, preprocess, tokenizer = load_clip(read_config(folder)["clip"], torch.device("cpu"))
        model = load_classifier(clip_model, tokenizer, folder, torch.device("cpu"))
        if arm == "seen-only":
            model.head.set_classes(tokenizer, unseen)
            model.classes = unseen
        logits = predict_logits(model, squash_transform(preprocess), held)
        scored = evaluate_scores(logits[:, [model.classes.index(u) for u in unseen]], truth)["mAP"]
        metrics = json.loads((folder / "metrics.json").read_text())
        chosen = next(e for e in metrics["validation"] if e["epoch"] == metrics["selected_epoch"])
        assert scored == pytest.approx(chosen["mAP"], abs=2e-3), (arm, scored, metrics["validation"])


def test_a_dir_recorded_before_a_new_classifier_setting_goes_on_while_it_keeps_its_default(tmp_path: Path) -> None:
    """A classifier setting added since (``config.added``, e.g. ``images``) is no change at its default, so the
    headline DIRs made before it can grow; a value other than the default is still refused."""
    from mlgen.errors import MlgenError
    from mlgen.experiment.runner import _check_settings

    config = ExperimentConfig(world="toy", unseen="circle,star", seeds=1)
    _check_settings(tmp_path, config, TINY_CLASSIFIER)
    recorded = json.loads((tmp_path / "settings.json").read_text())
    assert recorded["classifier"]["images"] == []
    del recorded["classifier"]["images"]  # as an mlgen before the setting wrote it
    (tmp_path / "settings.json").write_text(json.dumps(recorded))
    _check_settings(tmp_path, config, TINY_CLASSIFIER)
    with pytest.raises(MlgenError, match="setting 'classifier' differs"):
        _check_settings(tmp_path, config, dataclasses.replace(TINY_CLASSIFIER, images=("pictures",)))
