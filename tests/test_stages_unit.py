"""The pieces under the stages: labels, label sets, seeds, the discriminator, the runner, prompt checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from mlgen.config import GenerateConfig, build_config
from mlgen.errors import MlgenError, ShardFailed
from mlgen.filters.discriminator import grouping_softmax_one as grouping_softmax
from mlgen.filters.discriminator import keep
from mlgen.generate.diffusion import sample_seed
from mlgen.labels import parse_labels
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage, run_stage
from mlgen.prompts.composer import label_pairs, template_prompt
from mlgen.prompts.instructions import answer_lines
from mlgen.prompts.validate import PromptValidator, validate_synonyms


def test_labels_are_normalised_and_duplicates_refused() -> None:
    assert parse_labels("# c\n  Traffic   Light \n\nzebra\n", "f") == ["traffic light", "zebra"]
    with pytest.raises(MlgenError, match=r"f:3: duplicate label 'zebra' \(same as line 1\)"):
        parse_labels("Zebra\ncat\n zebra \n", "f")
    with pytest.raises(MlgenError, match="no labels"):
        parse_labels("# only\n\n", "f")


def test_label_pairs_follow_the_paper() -> None:
    labels = [f"l{i}" for i in range(17)]
    assert len(label_pairs(labels)) == 153  # 17 classes -> 153 pairs, self pairs included
    sets = label_pairs(["a", "b", "c"], exclude=(("a", "c"),))
    assert sets == [("a",), ("a", "b"), ("b",), ("b", "c"), ("c",)]
    with pytest.raises(MlgenError, match="exclude_pairs"):
        label_pairs(["a", "b"], exclude=(("a", "zz"),))
    assert template_prompt(("a", "b")) == "A photo of a a next to a b."


def test_sample_seeds_depend_only_on_run_seed_prompt_and_index() -> None:
    assert sample_seed(0, 5, 1) == 2868736382837156893  # pinned: SHA-256 of '0/5/1' (a resumed run redraws it)
    assert len({sample_seed(0, p, i) for p in range(50) for i in range(4)}) == 200
    assert sample_seed(1, 5, 1) != sample_seed(0, 5, 1)
    assert 0 <= sample_seed(7, 3, 2) < 2**63


def test_grouping_softmax_matches_the_definition() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, 3.0, -1.0])
    probs = grouping_softmax(logits, [0, 3])
    group0 = torch.softmax(logits[[0, 1, 2, 4]], 0)  # label 0 with the non-requested classes
    group3 = torch.softmax(logits[[3, 1, 2, 4]], 0)
    assert probs[0] == pytest.approx(group0[0].item())
    assert probs[3] == pytest.approx(group3[0].item())
    assert probs[1] == pytest.approx((group0[1] + group3[1]).item() / 2)  # mean over the groups
    # One requested label: a plain softmax over all classes.
    torch.testing.assert_close(grouping_softmax(logits, [1]), torch.softmax(logits, 0))


def test_grouping_softmax_is_differentiable() -> None:
    logits = torch.randn(6, requires_grad=True)
    grouping_softmax(logits, [1, 4])[[1, 4]].sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_keep_rule_needs_exactly_the_requested_set() -> None:
    probs = torch.tensor([0.9, 0.05, 0.7, 0.6])
    assert keep(probs, [0, 2], 0.5) == (True, {0, 2})
    assert keep(probs, [0, 3], 0.5)[0] is False  # top-2 is {0, 2}
    assert keep(probs, [0, 2], 0.8) == (False, {0})  # 2 is below the threshold


def test_llm_answers_are_validated() -> None:
    answers = ["1. A zebra grazes beside a bright surfboard on the sunny beach today.", "A zebra.",
               "Surfboards lean on a fence while zebras watch from the dry golden savanna.",
               "A zebra grazes beside a bright surfboard on the sunny beach today."]  # fmt: skip
    candidates = [line for answer in answers for line in answer_lines(answer, "one")]
    validator = PromptValidator(["zebra", "surfboard"], {}, None, 8, 60, 0.9)
    rejected: Counter = Counter()
    kept = validator.select(candidates, ("zebra", "surfboard"), [], rejected)
    assert kept[0].startswith("A zebra grazes") and len(kept) == 2  # numbering stripped, duplicate dropped
    assert rejected == {"too_short": 1, "duplicate": 1}
    synonyms = validate_synonyms(
        {"dog": ["1. Pup*, a hound, cat, dog, canine:, pup, dog house"], "cat": []}, 5, None, 0.6, rejected
    )
    assert synonyms["dog"] == ["pup", "hound", "canine"]


def test_settings_are_merged_and_validated() -> None:
    config = build_config(GenerateConfig, {"steps": 10, "shard-size": 7}, {"steps": 3, "size": None})
    assert (config.steps, config.shard_size, config.size) == (3, 7, None)
    with pytest.raises(MlgenError, match="'steps' must be a positive number"):
        build_config(GenerateConfig, {"steps": 0})
    with pytest.raises(MlgenError, match="unknown setting 'stepz'"):
        build_config(GenerateConfig, {"stepz": 3})
    with pytest.raises(MlgenError, match="'steps' must be a whole number"):
        build_config(GenerateConfig, {"steps": "many"})


class CountingStage(Stage):
    """A minimal stage: shard i writes one file; records which shards ran."""

    name = "counting"
    config_section = "counting"

    def __init__(self, run: RunDir, config: Any, fail_on: int | None = None) -> None:
        super().__init__(run, config)
        self.fail_on = fail_on
        self.ran: list[int] = []

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": i} for i in range(5)]

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        if shard["shard"] == self.fail_on:
            raise RuntimeError("boom")
        self.ran.append(shard["shard"])
        (self.folder / f"{shard['shard']}.out").write_text("x")
        return {"items": 2}


def test_runner_resumes_and_refuses_changed_settings(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    config = GenerateConfig(model="tiny", steps=3)
    with pytest.raises(RuntimeError):
        run_stage(CountingStage(run, config, fail_on=3))
    assert not (tmp_path / "counting" / "_SUCCESS.json").exists()
    resumed = CountingStage(run, config)
    marker = run_stage(resumed)
    assert resumed.ran == [3, 4]  # finished shards are skipped
    assert marker["counts"] == {"items": 10} and marker["shards"] == 5
    with pytest.raises(MlgenError, match=r"setting 'steps' changed from 3 to 4.*--overwrite"):
        run_stage(CountingStage(run, GenerateConfig(model="tiny", steps=4)))
    batch_only = CountingStage(run, GenerateConfig(model="tiny", steps=3, batch_size=99))  # runtime setting: allowed
    run_stage(batch_only)
    assert batch_only.ran == []
    redo = CountingStage(run, GenerateConfig(model="tiny", steps=4))
    run_stage(redo, overwrite=True)
    assert redo.ran == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "counting" / "plan.json").read_text())["settings"]["steps"] == 4
    assert not list(tmp_path.glob(".counting.discarded-*"))  # the old folder is gone


def test_runner_gives_each_rank_its_shards(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rank0, rank1 = CountingStage(run, GenerateConfig(model="tiny")), CountingStage(run, GenerateConfig(model="tiny"))
    assert run_stage(rank0, ranks=Ranks(0, 2, torch.device("cpu"))) == {}  # rank 1's shards missing
    run_stage(rank1, ranks=Ranks(1, 2, torch.device("cpu")))
    assert (rank0.ran, rank1.ran) == ([0, 2, 4], [1, 3])
    marker = run_stage(CountingStage(run, GenerateConfig(model="tiny")), ranks=Ranks(0, 2, torch.device("cpu")))
    assert marker["counts"] == {"items": 10}


def test_a_changed_setting_before_any_shard_finished_just_replans(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(RuntimeError):
        run_stage(CountingStage(run, GenerateConfig(model="tiny", steps=3), fail_on=0))  # e.g. a model that fails to load
    fixed = CountingStage(run, GenerateConfig(model="tiny", steps=5))
    run_stage(fixed)  # no work would be lost: no refusal
    assert fixed.ran == [0, 1, 2, 3, 4]


class CorruptInputStage(CountingStage):
    """Shards 1 and 3 have corrupt input."""

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        if shard["shard"] in (1, 3):
            raise ShardFailed(f"corrupt shard {shard['shard']:05d}.tar")
        return super().run_shard(shard)


def test_a_failed_shard_lets_the_others_run_and_leaves_the_stage_incomplete(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    stage = CorruptInputStage(run, GenerateConfig(model="tiny"))
    with pytest.raises(MlgenError, match=r"00001\.tar \(and 1 more failed shards\).*not complete"):
        run_stage(stage)
    assert stage.ran == [0, 2, 4]
    assert not (tmp_path / "counting" / "_SUCCESS.json").exists()
    fixed = CountingStage(run, GenerateConfig(model="tiny"))  # the input repaired: only the failed shards run
    assert run_stage(fixed)["shards"] == 5 and fixed.ran == [1, 3]
