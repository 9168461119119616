"""``--label-aliases FILE``: prompt validation, zero-shot evaluation (clip, s3) and fine-tuning's CLIP text side read
the user's other names of labels; the parsed aliases are a setting; bad aliases are one error line and write nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import mlgen
from mlgen.classifiers.evaluate import ZERO_SHOT_TEMPLATES, zero_shot_text
from mlgen.classifiers.features import label_embeddings
from mlgen.config import FinetuneConfig, PromptsConfig, build_config
from mlgen.errors import MlgenError
from mlgen.finetune.model import class_text_features
from mlgen.finetune.stage import FinetuneStage, every_rank
from mlgen.models.registry import load_open_clip
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts import stage as prompt_stage
from mlgen.prompts.validate import PromptValidator, validate_synonyms
from mlgen.world.render import render_dataset
from test_bad_input import Job, assert_one_error_line, make_folder, run_all
from test_finetune import FAST_SETTINGS, make_run
from zsl_layouts import make_coco_zsl

SHAPES = ["circle", "triangle", "star", "heart"]  # the headroom world's unseen labels
ALIASES = "heart: love symbol\nstar: sparkle\n"  # the names the toy-headroom teacher learned them by
CPU = torch.device("cpu")


# --- prompt validation ------------------------------------------------------------------------------------------


def test_a_prompt_may_name_a_label_by_its_alias_and_no_other_label_by_one() -> None:
    aliases = {"heart": ["love symbol"], "star": ["sparkle"]}
    validator = PromptValidator(SHAPES, {}, None, 6, 30, 0.9, aliases)
    plain = PromptValidator(SHAPES, {}, None, 6, 30, 0.9)
    text = "A large purple love symbol lies beside a small red circle on grey ground."
    assert validator.reason(text, ("circle", "heart")) is None
    assert plain.reason(text, ("circle", "heart")) == "missing_label"
    assert validator.reason(text, ("circle",)) == "other_label"  # the alias names heart, which is not requested
    assert plain.reason(text, ("circle",)) is None
    assert validator.reason("Two green sparkles float over a red circle on the grey floor.", ("star", "circle")) is None


def test_an_llm_synonym_that_is_another_labels_alias_is_refused() -> None:
    answers = {"circle": ["round, love symbol"], "heart": ["valentine"]}
    rejected: Counter = Counter()
    kept = validate_synonyms(answers, 3, None, 0.6, rejected, {"heart": ["love symbol"]})
    assert kept == {"circle": ["round"], "heart": ["valentine"]} and rejected == {"other_label": 1}
    assert validate_synonyms(answers, 3, None, 0.6, Counter())["circle"] == ["round", "love symbol"]


class AliasWriter:
    """An LLM that names heart only as 'love symbol' (as web text may): its prompts pass only with the alias."""

    kind, model = "scripted", "scripted"

    def complete(self, requests):
        answers = []
        for request in requests:
            text = request.messages[-1][1]
            if not text.startswith("Objects: "):
                answers.append("")  # no synonyms
                continue
            objects = text.removeprefix("Objects: ").replace("a heart", "a love symbol")
            answers.append(f"On a plain grey floor lie {objects}, each drawn large and clear.")
        return answers


@pytest.mark.parametrize("aliases", [None, {"Heart": "Love  Symbol"}])
def test_the_prompt_stage_accepts_prompts_that_use_an_alias(tmp_path: Path, monkeypatch, aliases) -> None:
    monkeypatch.setattr(prompt_stage, "make_backend", lambda *args: AliasWriter())
    config = PromptsConfig(llm="scripted", prompts_per_set=1, synonyms_per_label=1, label_aliases=aliases)
    run_stage(prompt_stage.PromptStage(RunDir(tmp_path / "R"), config, ["circle", "heart"]))
    rows = pq.read_table(tmp_path / "R" / "prompts" / "prompts.parquet").to_pylist()
    sources = {tuple(row["labels"]): row["source"] for row in rows}
    assert sources[("circle",)] == "llm:scripted"
    with_heart = [source for labels, source in sources.items() if "heart" in labels]
    assert len(with_heart) == 2 and set(with_heart) == {"llm:scripted" if aliases else "template"}
    settings = json.loads((tmp_path / "R" / "prompts" / "plan.json").read_text())["settings"]
    recorded = yaml.safe_load((tmp_path / "R" / "config.yaml").read_text())["prompts"]
    if aliases:  # recorded normalised, as parsed
        assert settings["label_aliases"] == recorded["label_aliases"] == {"heart": ["love symbol"]}
    else:  # a run without aliases keeps the settings it had before aliases existed
        assert "label_aliases" not in settings


def test_a_config_files_aliases_are_checked_against_the_labels(tmp_path: Path) -> None:
    config = PromptsConfig(llm="template", label_aliases={"moon": ["crescent"]})
    with pytest.raises(MlgenError, match="setting 'label_aliases': 'moon' is not one of the labels"):
        prompt_stage.PromptStage(RunDir(tmp_path / "R"), config, ["circle", "heart"])
    assert not (tmp_path / "R").exists()


# --- the text side: zero-shot and fine-tuning --------------------------------------------------------------------


def test_a_labels_text_embedding_is_the_mean_over_its_names() -> None:
    model, _, tokenizer = load_open_clip("tiny", CPU)
    unit = torch.nn.functional.normalize

    def ensemble(names: list[str]) -> torch.Tensor:  # each name's template ensemble, as zero-shot had it
        return unit(
            torch.stack([label_embeddings(model, tokenizer, names, CPU, t) for t in ZERO_SHOT_TEMPLATES]).mean(0)
        )

    torch.testing.assert_close(zero_shot_text(model, tokenizer, [[s] for s in SHAPES], CPU), ensemble(SHAPES))
    both = zero_shot_text(model, tokenizer, [["circle"], ["heart", "love symbol", "valentine"]], CPU)
    torch.testing.assert_close(both[0], ensemble(["circle"])[0])
    torch.testing.assert_close(both[1], unit(ensemble(["heart", "love symbol", "valentine"]).mean(0), dim=-1))
    # fine-tuning's discriminator: the same mean over bare names
    with torch.no_grad():
        bare = unit(model.encode_text(tokenizer(["circle", "heart", "love symbol"])).float(), dim=-1)
    features = class_text_features(model, tokenizer, [["circle"], ["heart", "love symbol"]], CPU)
    torch.testing.assert_close(features[0], bare[0])
    torch.testing.assert_close(features[1], unit(bare[1:].mean(0), dim=0))


def test_finetunings_discriminator_reads_the_aliases(tmp_path: Path) -> None:
    """The stage's CLIP text side is the mean over each label's names; the aliases are a recorded setting."""
    run = RunDir(make_run(tmp_path))
    config = build_config(FinetuneConfig, {**FAST_SETTINGS, "label_aliases": {"Zebra": ["striped horse"]}})
    stage = FinetuneStage(run, config)
    assert stage.settings()["label_aliases"] == {"zebra": ["striped horse"]}
    stage.setup(every_rank())
    model, _, tokenizer = load_open_clip("tiny", CPU)
    names = [["zebra", "striped horse"], ["kite"], ["surfboard"]]
    torch.testing.assert_close(stage.parts.class_features, class_text_features(model, tokenizer, names, CPU))
    plain = class_text_features(model, tokenizer, [["zebra"], ["kite"], ["surfboard"]], CPU)
    assert not torch.allclose(stage.parts.class_features[0], plain[0])
    assert "label_aliases" not in FinetuneStage(run, build_config(FinetuneConfig, FAST_SETTINGS)).settings()


# --- the command line: a toy-world run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with R (the four unseen headroom shapes, template prompts), aliases.txt and 300 headroom test
    scenes in real/."""
    folder = make_folder(
        tmp_path_factory.mktemp("aliases") / "toy",
        {
            "c.txt": "\n".join(SHAPES) + "\n",
            "aliases.txt": ALIASES,
            "aliases.yaml": "star: [Sparkle]\nheart: [love symbol]\n",
        },
    )
    render_dataset(folder / "real", n=300, seed=0, world="headroom", stream="test")
    done = mlgen(
        "prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", "--label-aliases", "aliases.txt", cwd=folder
    )
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.slow
def test_prompt_aliases_are_a_setting_a_changed_file_is_refused(toy_run: Path) -> None:
    run = toy_run / "R"
    settings = json.loads((run / "prompts" / "plan.json").read_text())["settings"]
    assert settings["label_aliases"] == {"star": ["sparkle"], "heart": ["love symbol"]}
    assert yaml.safe_load((run / "config.yaml").read_text())["prompts"]["label_aliases"] == settings["label_aliases"]
    marker = (run / "prompts" / "_SUCCESS.json").read_text()
    # the same aliases in the other format are the same setting: the finished stage is kept
    same = mlgen("prompts", "--run", "R", "--llm", "template", "--label-aliases", "aliases.yaml", cwd=toy_run)
    assert same.returncode == 0, same.stderr
    (toy_run / "changed.txt").write_text("heart: love symbol\n", encoding="utf-8")
    changed = mlgen("prompts", "--run", "R", "--llm", "template", "--label-aliases", "changed.txt", cwd=toy_run)
    assert_one_error_line(changed, "label_aliases", "--overwrite")
    assert (run / "prompts" / "_SUCCESS.json").read_text() == marker


def zero_shot(folder: Path, method: str, *extra: str) -> dict:
    args = ["evaluate", "--run", "R", "--zero-shot", method, "--clip", "toy-headroom", "--data", "real/labels.csv"]
    done = mlgen(*args, *extra, cwd=folder)
    assert done.returncode == 0, done.stderr
    return json.loads((folder / "R" / "zero-shot" / method / "metrics.json").read_text())


@pytest.mark.slow
def test_aliases_lift_the_teachers_zero_shot_on_the_labels_it_knows_by_another_name(toy_run: Path) -> None:
    """toy-headroom's captions called hearts and stars only 'love symbol' and 'sparkle': their label names score
    poorly, the mean with the alias far better (1,000 test scenes: ZSL mAP 0.680 -> 0.823, README)."""
    plain = zero_shot(toy_run, "clip")
    aliased = zero_shot(toy_run, "clip", "--label-aliases", "aliases.txt")
    assert "aliases" not in plain and aliased["aliases"] == {"star": ["sparkle"], "heart": ["love symbol"]}
    before, after = plain["zsl"]["per_class_AP"], aliased["zsl"]["per_class_AP"]
    assert after["heart"] >= before["heart"] + 0.2 and after["star"] >= before["star"] + 0.05, (before, after)
    assert after["circle"] == pytest.approx(before["circle"]) and after["triangle"] == pytest.approx(before["triangle"])
    s3 = zero_shot(toy_run, "s3", "--label-aliases", "aliases.txt")
    assert s3["synonyms"]["heart"] == ["heart", "love symbol"] and s3["synonyms"]["circle"] == ["circle"]
    assert s3["zsl"]["mAP"] >= zero_shot(toy_run, "s3")["zsl"]["mAP"] + 0.05


BAD_ALIASES = {  # file content (None: no file) -> what the one error line names
    "missing": (None, ("aliases file not found", "bad.txt")),
    "malformed": ("heart: [love symbol\n", ("bad.txt", "not 'label: alias, alias' lines")),
    "unknown-label": ("moon: crescent\n", ("bad.txt", "'moon' is not one of the labels")),
    "alias-is-a-label": ("heart: love symbol, Star\n", ("bad.txt", "alias 'star' of 'heart' is another label")),
}


@pytest.mark.slow
def test_bad_aliases_are_one_error_line_and_write_nothing(toy_run: Path, tmp_path: Path) -> None:
    """prompts on a fresh run, evaluate --zero-shot and finetune on the toy run: each refused, nothing written."""
    jobs, expected = {}, {}
    for name, (text, mentions) in BAD_ALIASES.items():
        files = {"c.txt": "\n".join(SHAPES) + "\n", **({"bad.txt": text} if text is not None else {})}
        fresh = make_folder(tmp_path / f"prompts-{name}", files)
        jobs[f"prompts-{name}"] = Job(
            fresh, [["prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", "--label-aliases", "bad.txt"]]
        )
        expected[f"prompts-{name}"] = mentions
        if text is not None:
            (toy_run / f"{name}.txt").write_text(text, encoding="utf-8")
        bad = f"{name}.txt" if text is not None else "bad.txt"
        for command, args in {
            "evaluate": ["evaluate", "--zero-shot", "clip", "--clip", "toy-headroom", "--data", "real/labels.csv"],
            "finetune": ["finetune", "--size", "32", "--denoising-steps", "2", "--max-train-steps", "1"],
        }.items():
            jobs[f"{command}-{name}"] = Job(toy_run, [[*args, "--run", "R", "--label-aliases", bad]])
            expected[f"{command}-{name}"] = tuple(m.replace("bad.txt", bad) for m in mentions)
    jobs["evaluate-without-zero-shot"] = Job(toy_run, [["evaluate", "--run", "R", "--label-aliases", "aliases.txt"]])
    expected["evaluate-without-zero-shot"] = ("--label-aliases", "--zero-shot")
    outcomes = run_all(jobs)
    for name, [outcome] in outcomes.items():
        assert_one_error_line(outcome.proc, *expected[name])
        assert outcome.files_after == outcome.files_before, name
        assert outcome.run_after == outcome.run_before, f"{name} changed the run"
        if name.startswith("prompts-"):
            assert not (jobs[name].folder / "R").exists(), name
    assert not (toy_run / "R" / "finetune").exists()


@pytest.mark.slow
def test_finetune_records_the_aliases_and_refuses_a_changed_file(toy_run: Path) -> None:
    args = ["finetune", "--run", "R", "--size", "32", "--denoising-steps", "2", "--max-train-steps", "1", "--save-every", "1"]
    done = mlgen(*args, "--label-aliases", "aliases.txt", cwd=toy_run)
    assert done.returncode == 0, done.stderr
    settings = json.loads((toy_run / "R" / "finetune" / "plan.json").read_text())["settings"]
    assert settings["label_aliases"] == {"star": ["sparkle"], "heart": ["love symbol"]}
    assert (
        yaml.safe_load((toy_run / "R" / "config.yaml").read_text())["finetune"]["label_aliases"]
        == (settings["label_aliases"])
    )
    (toy_run / "other.txt").write_text("heart: valentine\n", encoding="utf-8")
    refused = mlgen(*args, "--label-aliases", "other.txt", cwd=toy_run)
    assert_one_error_line(refused, "label_aliases", "--overwrite")


@pytest.mark.slow
def test_a_benchmarks_aliases_are_checked_against_its_own_labels(tmp_path: Path) -> None:
    """coco-zsl:ROOT scores its 65 labels, not the run's: the aliases file is read against those."""
    data = f"coco-zsl:{make_coco_zsl(tmp_path / 'coco')}"
    (tmp_path / "run").mkdir()
    (tmp_path / "coco.txt").write_text("airplane: aeroplane, jet plane\n", encoding="utf-8")
    (tmp_path / "shapes.txt").write_text(ALIASES, encoding="utf-8")
    args = ["evaluate", "--run", tmp_path / "run", "--zero-shot", "clip", "--clip", "tiny", "--data", data]
    args.append("--label-aliases")
    assert_one_error_line(mlgen(*args, tmp_path / "shapes.txt"), "shapes.txt", "'heart' is not one of the labels")
    assert list((tmp_path / "run").iterdir()) == []
    done = mlgen(*args, tmp_path / "coco.txt")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "run" / "zero-shot" / "clip" / "metrics.json").read_text())
    assert metrics["aliases"] == {"airplane": ["aeroplane", "jet plane"]}
