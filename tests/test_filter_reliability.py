"""The whole-run filter: the NUS-WIDE top-k rule, the teacher's per-label reliability, the gate, the fallback,
user aliases, the image prototype, and one error line for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import mlgen
from mlgen.classifiers.source import shard_samples
from mlgen.filters.decide import auroc, auto_topk, fallback, prototype_cosines, topk_keep

SHAPES = ("circle", "triangle", "star", "heart")  # the toy teacher never read "star" nor "heart" in its captions
CLIP = "toy-headroom"
RULE_ONLY = ["--gate", "0", "--min-keep", "0"]  # the COCO rule alone; each test turns on what it tests
ALIASES = "heart: love symbol\nstar: sparkle\n"  # the names its captions used instead


# --- the NUS-WIDE rule on hand-made probability rows ---------------------------------------------


def test_topk_drops_an_image_whose_requested_label_is_outside_the_top_k() -> None:
    probs = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.1, 0.7]])
    requested = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    kept, _ = topk_keep(probs, requested, k=3)
    assert kept.tolist() == [True, False]  # label 2 is 3rd in row 0, 4th in row 1


def test_topk_adds_other_top_k_labels_above_the_threshold_only() -> None:
    probs = torch.tensor([[0.9, 0.3, 0.05, 0.6], [0.9, 0.12, 0.09, 0.6]])
    requested = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    kept, labels = topk_keep(probs, requested, k=3, extra_threshold=0.1)
    assert kept.tolist() == [True, True]
    # row 0: 0.6 and 0.3 are in the top-3 and above 0.1; row 1: 0.12 above it, 0.09 outside the top-3 and below
    assert labels.int().tolist() == [[1, 1, 0, 1], [1, 1, 0, 1]]
    _, strict = topk_keep(probs, requested, k=3, extra_threshold=0.5)
    assert strict.int().tolist() == [[1, 0, 0, 1], [1, 0, 0, 1]]  # below the threshold: not a label
    _, narrow = topk_keep(probs, requested, k=2, extra_threshold=0.1)
    assert narrow.int().tolist() == [[1, 0, 0, 1], [1, 0, 0, 1]]  # above it but outside the top-2: not a label


def test_auto_topk_is_the_official_share_with_room_for_one_extra_label() -> None:
    assert auto_topk(81, torch.ones(1, 2, dtype=torch.bool)).tolist() == [7]  # NUS-WIDE's top-7 of 81
    assert auto_topk(4, torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)).tolist() == [3, 2]
    assert auto_topk(2, torch.ones(1, 2, dtype=torch.bool)).tolist() == [2]  # never more than the labels


def test_auroc_counts_pairs_and_ties_half() -> None:
    scores = torch.tensor([0.9, 0.8, 0.8, 0.1])
    assert auroc(scores, torch.tensor([True, True, False, False])) == pytest.approx(0.875)  # one tie of four pairs
    assert auroc(scores, torch.tensor([False, False, True, True])) == pytest.approx(0.125)
    assert auroc(scores, torch.ones(4, dtype=torch.bool)) is None


def test_fallback_refills_an_emptied_label_with_its_most_confident_images() -> None:
    requested = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    probs = torch.tensor([[0.2, 0], [0.9, 0], [0.5, 0], [0.7, 0], [0, 0.9], [0, 0.8]])
    kept = torch.tensor([False, False, False, False, True, True])
    usable = torch.tensor([True, False, True, True, True, True])  # image 1 is a duplicate: never added back
    added = fallback(kept, requested, probs, min_keep=0.5, usable=usable)
    assert added.tolist() == [False, False, True, True, False, False]  # 0.7 and 0.5: half of label 0's four
    assert not fallback(kept, requested, probs, min_keep=0.0, usable=usable).any()


def test_prototype_cosines_leave_each_image_out_of_its_own_labels_prototypes() -> None:
    generator = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(12, 6, generator=generator), dim=-1)
    columns = torch.nn.functional.normalize(torch.randn(5, 6, generator=generator), dim=-1)
    requested = torch.rand(12, 5, generator=generator) < 0.4
    requested[:, 3] = False
    requested[4, 3] = True  # label 3: one image, no prototype left for it
    requested[:, 4] = False  # label 4: no image at all
    requested[[0, 1], 0] = True  # label 0: at least two images
    weight = 0.3
    blended = prototype_cosines(unit, columns, requested, weight)
    for i in range(len(unit)):
        for c in range(len(columns)):
            others = [j for j in range(len(unit)) if requested[j, c] and j != i]
            column = columns[c]
            if others:
                prototype = torch.nn.functional.normalize(unit[others].mean(0), dim=0)
                column = torch.nn.functional.normalize((1 - weight) * columns[c] + weight * prototype, dim=0)
            assert float(blended[i, c]) == pytest.approx(float(unit[i] @ column), abs=1e-5), (i, c)
    assert blended[:, 4] == pytest.approx(unit @ columns[4], abs=1e-6)  # the text alone
    assert prototype_cosines(unit, columns, requested, 0.0) == pytest.approx(unit @ columns.T, abs=1e-6)


# --- a real run of the toy world ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The headroom world's SD draws the four unseen shapes (a template prompt per label set); its CLIP filters."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n", encoding="utf-8")
    (root / "aliases.txt").write_text(ALIASES, encoding="utf-8")
    run = root / "run"
    generate = ["generate", "--classes", root / "classes.txt", "--model", "toy-headroom", "--llm", "template"]
    for args in ([*generate, "--denoising-steps", "10", "--images-per-prompt", "12"], ["filter", "--clip", CLIP, *RULE_ONLY]):
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    return run


def rescore(run: Path, *args):
    """The filter decided again from the cached embeddings, with other options."""
    return mlgen("filter", "--run", run, "--clip", CLIP, "--rescore", *RULE_ONLY, *args)  # the last value counts


def reliability(run: Path) -> dict[str, dict]:
    data = json.loads((run / "filtered" / "reliability.json").read_text(encoding="utf-8"))
    return {entry["label"]: entry for entry in data["labels"]}


def own_name_auroc(entry: dict) -> float:
    return next(n["auroc"] for n in entry["names"] if n["source"] == "label")


def decisions(run: Path) -> list[dict]:
    return pq.read_table(sorted((run / "filtered").glob("*_decisions.parquet"))).to_pylist()


def test_reliability_ranks_the_names_the_teacher_never_read_lowest(toy_run: Path) -> None:
    labels = reliability(toy_run)
    ranked = sorted(labels, key=lambda label: own_name_auroc(labels[label]))
    assert set(ranked[:2]) == {"star", "heart"}, {label: own_name_auroc(labels[label]) for label in ranked}
    for entry in labels.values():
        assert entry["generated"] > 0 and 0 <= entry["kept"] <= entry["generated"]
        assert entry["kept_share"] == pytest.approx(entry["kept"] / entry["generated"], abs=1e-4)
        assert not entry["gated"] and entry["fallback"] == 0  # both off in this run


def test_aliases_raise_the_auroc_of_the_labels_the_teacher_knows_by_another_name(toy_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    done = rescore(run, "--label-aliases", toy_run.parent / "aliases.txt")
    assert done.returncode == 0, done.stderr
    before, after = reliability(toy_run), reliability(run)
    for label, alias in (("heart", "love symbol"), ("star", "sparkle")):
        names = {n["name"]: n for n in after[label]["names"]}
        assert names[alias]["source"] == "alias"
        assert names[alias]["auroc"] > own_name_auroc(before[label]), after[label]
        assert after[label]["reliability"] > own_name_auroc(before[label])
    # --text best then reads each label by its most reliable name
    done = rescore(run, "--text", "best", "--label-aliases", run.parent / "x.txt")
    assert done.returncode == 1 and "aliases file not found" in done.stderr


def test_the_gate_keeps_a_label_the_teacher_cannot_read_and_says_so(toy_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    labels = reliability(toy_run)
    worst = min(labels, key=lambda label: labels[label]["filter_auroc"])
    cutoff = (labels[worst]["filter_auroc"] + sorted(e["filter_auroc"] for e in labels.values())[1]) / 2
    done = rescore(run, "--gate", f"{cutoff:.4f}")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"not filtering on {worst}:" in warnings[0]
    gated = reliability(run)
    assert [label for label, entry in gated.items() if entry["gated"]] == [worst]
    assert gated[worst]["kept"] > labels[worst]["kept"]
    for row in decisions(run):
        assert (f"gated:{worst}" in row["reason"]) == (worst in row["labels"])
        if row["labels"] == [worst]:  # nothing else to judge it on: kept
            assert row["kept"]


def test_min_keep_never_leaves_a_label_below_its_share(toy_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    done = rescore(run, "--min-keep", "0.9")
    assert done.returncode == 0, done.stderr
    labels = reliability(run)
    assert sum(entry["fallback"] for entry in labels.values()) > 0
    for entry in labels.values():
        assert entry["kept"] >= 0.9 * entry["generated"]
    rows = decisions(run)
    assert all(row["kept"] for row in rows if "fallback" in row["reason"].split(","))


def test_a_competitor_can_take_an_image_from_a_label_it_is_not(toy_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    (tmp_path / "one.txt").write_text("cross\n", encoding="utf-8")  # heart's same-colour partner, a seen shape
    done = rescore(run, "--competitors", tmp_path / "one.txt")
    assert done.returncode == 0, done.stderr
    assert sum(r["kept"] for r in decisions(run)) < sum(r["kept"] for r in decisions(toy_run))
    assert any("extra:cross" in r["reason"] and not r["kept"] for r in decisions(run))  # dropped for a competitor
    assert json.loads((run / "filtered" / "reliability.json").read_text())["competitors"] == ["cross"]


def test_topk_rule_trains_on_the_labels_it_adds(toy_run: Path, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    done = rescore(run, "--rule", "topk", "--extra-threshold", "0.05")
    assert done.returncode == 0, done.stderr
    manifest = pq.read_table(sorted((run / "filtered").glob("0*.parquet"))[0]).to_pylist()
    assert manifest and all(set(row["requested"]) <= set(row["labels"]) for row in manifest)
    assert any(len(row["labels"]) > len(row["requested"]) for row in manifest)
    samples = [meta for meta, _ in shard_samples(run / "filtered")]  # what the classifier reads its targets from
    assert len(samples) == sum(1 for row in decisions(run) if row["kept"])
    assert all(set(meta["requested"]) <= set(meta["labels"]) for meta in samples)
    assert any(len(meta["labels"]) > len(meta["requested"]) for meta in samples)


def test_a_prototype_lifts_the_labels_the_teacher_cannot_read_but_the_gate_reads_the_names(
    toy_run: Path, tmp_path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    done = rescore(run, "--prototype", "0.5")
    assert done.returncode == 0, done.stderr
    before, after = reliability(toy_run), reliability(run)
    assert json.loads((run / "filtered" / "reliability.json").read_text())["prototype"] == 0.5
    heart = after["heart"]
    assert heart["prototype_auroc"] > heart["filter_auroc"] == before["heart"]["filter_auroc"], heart
    assert all(entry["prototype_auroc"] is None for entry in before.values())  # off: not measured
    # a cutoff between heart's name and its blend: the gate decides on the name alone, whatever the blend scores
    cutoff = (heart["filter_auroc"] + heart["prototype_auroc"]) / 2
    done = rescore(run, "--prototype", "0.5", "--gate", f"{cutoff:.4f}")
    assert done.returncode == 0, done.stderr
    gated = reliability(run)
    assert gated["heart"]["gated"], gated["heart"]
    for label, entry in gated.items():
        assert entry["filter_auroc"] == before[label]["filter_auroc"]
        assert entry["gated"] == (entry["filter_auroc"] < cutoff), entry


BAD_INPUTS = [
    (["--label-aliases", "{dir}/malformed.txt"], "not 'label: alias, alias' lines"),
    (["--label-aliases", "{dir}/unknown.txt"], "'zebra' is not one of the labels"),
    (["--label-aliases", "{dir}/clash.txt"], "alias 'circle' of 'heart' is another label"),
    (["--rule", "nus"], "setting 'rule' has an invalid value"),
    (["--gate", "1.5"], "setting 'gate' has an invalid value"),
    (["--min-keep", "-0.1"], "setting 'min_keep' has an invalid value"),
    (["--prototype", "1.5"], "setting 'prototype' has an invalid value"),
    (["--prototype", "0.5", "--text", "s3"], "--prototype blends one text embedding per label"),
    (["--competitors", "{dir}/clash-competitors.txt"], "competitor 'star' is one of the run's labels"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS)
def test_a_bad_filter_input_is_one_line_and_changes_nothing(toy_run: Path, args, message) -> None:
    folder = toy_run.parent
    (folder / "malformed.txt").write_text("heart: [love symbol\n", encoding="utf-8")
    (folder / "unknown.txt").write_text("zebra: horse\n", encoding="utf-8")
    (folder / "clash.txt").write_text("heart: love symbol, circle\n", encoding="utf-8")
    (folder / "clash-competitors.txt").write_text("square\nstar\n", encoding="utf-8")
    before = {p: p.stat().st_mtime_ns for p in toy_run.rglob("*")}
    done = mlgen("filter", "--run", toy_run, "--clip", CLIP, "--overwrite", *[a.format(dir=folder) for a in args])
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and message in done.stderr, done.stderr
    assert {p: p.stat().st_mtime_ns for p in toy_run.rglob("*")} == before
