"""``mlgen finetune --names-from FILE``: the CLIP-score loss reads each label by its best name in an earlier filtered
run's reliability.json (aliases still averaged in); the parsed names are a setting; a bad file is one error line and
changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import mlgen
from mlgen.config import FinetuneConfig, build_config
from mlgen.errors import MlgenError
from mlgen.finetune.model import class_text_features
from mlgen.finetune.names import best_name_setting, best_names_from_mapping, read_best_names
from mlgen.finetune.stage import FinetuneStage, every_rank
from mlgen.models.registry import load_open_clip
from mlgen.pipeline.rundir import RunDir
from test_bad_input import Job, assert_one_error_line, make_folder, run_all
from test_finetune import FAST_SETTINGS

SHAPES = ["circle", "triangle", "star", "heart"]  # the headroom world's unseen labels
CLIP = "toy-headroom"  # its teacher read hearts and stars only as "love symbol" and "sparkle"
FINETUNE = ["finetune", "--run", "R2", "--clip", CLIP, "--size", "32", "--denoising-steps", "2", "--max-train-steps", "1"]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """R1: a first round without fine-tuning (headroom SD, its CLIP filters with the aliases); R2: the next
    round's prompts, where fine-tuning runs before anything is generated."""
    folder = make_folder(
        tmp_path_factory.mktemp("names") / "toy",
        {"c.txt": "\n".join(SHAPES) + "\n", "aliases.txt": "heart: love symbol\nstar: sparkle\n"},
    )
    generate = ["generate", "--run", "R1", "--classes", "c.txt", "--model", "toy-headroom", "--llm", "template"]
    for args in (
        [*generate, "--denoising-steps", "10", "--images-per-prompt", "4"],
        ["filter", "--run", "R1", "--clip", CLIP, "--label-aliases", "aliases.txt"],
        ["prompts", "--run", "R2", "--classes", "c.txt", "--llm", "template"],
    ):
        done = mlgen(*args, cwd=folder)
        assert done.returncode == 0, done.stderr
    return folder


def file_best_names(path: Path) -> dict[str, str]:
    return {row["label"]: row["best_name"] for row in json.loads(path.read_text(encoding="utf-8"))["labels"]}


@pytest.mark.slow
def test_the_loss_reads_each_labels_best_name_and_still_averages_the_aliases(rounds: Path) -> None:
    path = rounds / "R1" / "filtered" / "reliability.json"
    best = read_best_names(path, SHAPES)
    assert best == file_best_names(path) and best["heart"] == "love symbol", best  # heart's own name: AUROC < 0.5
    aliases = {"heart": ["love symbol", "valentine"]}
    config = {**FAST_SETTINGS, "clip": CLIP, "label_aliases": aliases, "best_names": best_name_setting(best)}
    stage = FinetuneStage(RunDir(rounds / "R2"), build_config(FinetuneConfig, config))
    assert stage.settings()["best_names"] == {label: name for label, name in best.items() if name != label}
    stage.setup(every_rank())
    model, _, tokenizer = load_open_clip(CLIP, torch.device("cpu"))
    # the rule: a label's best name in its own name's place, then its aliases, each once
    names = [[best[label]] for label in SHAPES]
    names[SHAPES.index("heart")] = ["love symbol", "valentine"]
    expected = class_text_features(model, tokenizer, names, torch.device("cpu"))
    torch.testing.assert_close(stage.parts.class_features, expected)
    plain = class_text_features(model, tokenizer, [["circle"], ["triangle"], ["star"], ["heart"]], torch.device("cpu"))
    assert not torch.allclose(stage.parts.class_features[SHAPES.index("heart")], plain[SHAPES.index("heart")])
    # a file whose best names are the labels themselves is the setting of a run without one (same hash)
    same = FinetuneStage(RunDir(rounds / "R2"), build_config(FinetuneConfig, {**FAST_SETTINGS, "best_names": {}}))
    assert "best_names" not in same.settings()


@pytest.mark.parametrize(
    ("best", "aliases", "message"),
    [
        ({"moon": "crescent"}, None, "'moon' is not one of the labels"),
        ({"heart": "circle"}, None, "best name 'circle' of 'heart' is also a name of 'circle'"),
        ({"heart": "sparkle", "star": "sparkle"}, None, "best name 'sparkle' of 'star' is also a name of 'heart'"),
        ({"star": "love symbol"}, {"heart": ["love symbol"]}, "'love symbol' of 'star' is also a name of 'heart'"),
        ({"heart": ""}, None, "the best name of 'heart' must be a non-empty name"),
        (["heart"], None, "expected a mapping of label to name"),
    ],
)
def test_a_config_files_best_names_are_checked_against_the_labels_and_aliases(best, aliases, message) -> None:
    with pytest.raises(MlgenError, match=message):
        best_names_from_mapping(best, "setting 'best_names'", SHAPES, aliases)


@pytest.mark.slow
def test_finetune_records_the_best_names_and_refuses_a_changed_file(rounds: Path) -> None:
    path = rounds / "R1" / "filtered" / "reliability.json"
    done = mlgen(*FINETUNE, "--save-every", "1", "--names-from", path, cwd=rounds)
    assert done.returncode == 0, done.stderr
    settings = json.loads((rounds / "R2" / "finetune" / "plan.json").read_text())["settings"]
    recorded = {label: name for label, name in file_best_names(path).items() if name != label}
    assert settings["best_names"] == recorded and recorded["heart"] == "love symbol"
    assert yaml.safe_load((rounds / "R2" / "config.yaml").read_text())["finetune"]["best_names"] == recorded
    marker = (rounds / "R2" / "finetune" / "_SUCCESS.json").read_text()
    # the names, not the path, are the setting: a copy elsewhere is the same setting, the finished stage is kept
    shutil.copy(path, rounds / "copy.json")
    same = mlgen(*FINETUNE, "--save-every", "1", "--names-from", "copy.json", cwd=rounds)
    assert same.returncode == 0, same.stderr
    assert (rounds / "R2" / "finetune" / "_SUCCESS.json").read_text() == marker
    write_edited(path, rounds / "other.json", lambda rows: rows[SHAPES.index("heart")].update(best_name="valentine"))
    refused = mlgen(*FINETUNE, "--save-every", "1", "--names-from", "other.json", cwd=rounds)
    assert_one_error_line(refused, "best_names", "--overwrite")
    assert (rounds / "R2" / "finetune" / "_SUCCESS.json").read_text() == marker


def write_edited(source: Path, target: Path, edit) -> None:
    """``source``'s reliability.json with its label rows edited in place by ``edit(rows)``, written to ``target``."""
    data = json.loads(source.read_text(encoding="utf-8"))
    edit(data["labels"])
    target.write_text(json.dumps(data), encoding="utf-8")


def rename_all(rows: list[dict]) -> None:
    for row, label in zip(rows, ["moon", "sun", "cloud", "tree"], strict=True):
        row["label"] = label


BAD_FILES = {  # name -> (edit of the real file, or text; None: no file) and what the one error line names
    "missing": (None, ("reliability file not found", "bad.json")),
    "not-json": ("{not json", ("bad.json", "not JSON")),
    "not-reliability": ('{"labels": [{"label": "heart"}]}', ("bad.json", "not a reliability file")),
    "no-best-name": (lambda rows: rows[0].update(best_name=None), ("bad.json", "not a reliability file")),
    "a-label-missing": (lambda rows: rows.pop(SHAPES.index("heart")), ("bad.json", "no best name for 'heart'")),
    "other-labels": (rename_all, ("bad.json", "made for other labels", "'moon'")),
    "another-labels-name": (
        lambda rows: rows[SHAPES.index("heart")].update(best_name="Circle"),
        ("bad.json", "best name 'circle' of 'heart' is also a name of 'circle'"),
    ),
}


@pytest.mark.slow
def test_a_bad_names_file_is_one_error_line_and_changes_nothing(rounds: Path, tmp_path: Path) -> None:
    real = rounds / "R1" / "filtered" / "reliability.json"
    jobs = {}
    for name, (content, _) in BAD_FILES.items():
        folder = tmp_path / name
        shutil.copytree(rounds / "R2", folder / "R2", ignore=shutil.ignore_patterns("finetune", "text_encoder"))
        if callable(content):
            write_edited(real, folder / "bad.json", content)
        elif content is not None:
            (folder / "bad.json").write_text(content, encoding="utf-8")
        jobs[name] = Job(folder, [[*FINETUNE, "--names-from", "bad.json"]], run="R2")
    for name, [outcome] in run_all(jobs).items():
        assert_one_error_line(outcome.proc, *BAD_FILES[name][1])
        assert outcome.files_after == outcome.files_before, name
        assert outcome.run_after == outcome.run_before, f"{name} changed the run"
        assert not (jobs[name].folder / "R2" / "finetune").exists(), name
