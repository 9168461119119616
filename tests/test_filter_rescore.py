"""Filter decisions carry reasons; image embeddings are cached so --rescore never runs the image encoder."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import FAST_GENERATE, mlgen
from helpers import read_in_chromium
from mlgen import workflow
from mlgen.config import FilterConfig
from mlgen.filters.stage import FilterStage
from mlgen.pipeline.rundir import RunDir

# The rule alone: the tiny CLIP's random weights read no label (AUROC about 0.5), so the default gate would keep
# every image, and the fallback would refill what dedup drops.
NO_GATE = {"gate": 0.0, "min_keep": 0.0}
RULE_ONLY = ["--gate", "0", "--min-keep", "0"]


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rescore")
    (root / "classes.txt").write_text("zebra\nkite\nsurfboard\n", encoding="utf-8")
    (root / "no-lexicon.yaml").write_text("prompts:\n  synonym_source: llm\n", encoding="utf-8")  # no LLM: no synonym
    run = root / "run"
    generate = ["generate", "--classes", root / "classes.txt", "--config", root / "no-lexicon.yaml", *FAST_GENERATE]
    for args in (generate, ["filter", *RULE_ONLY]):
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    return run


def decisions(run: Path) -> list[dict]:
    return pq.read_table(sorted((run / "filtered").glob("*_decisions.parquet"))).to_pylist()


def test_every_dropped_image_says_why(filtered_run: Path) -> None:
    rows = decisions(filtered_run)
    assert any(not r["kept"] for r in rows)
    for row in rows:
        if row["kept"]:
            assert row["reason"] == ""
        else:
            reasons = row["reason"].split(",")
            assert all(r.split(":")[0] in ("missing", "extra") for r in reasons)
            missing = {r.split(":", 1)[1] for r in reasons if r.startswith("missing:")}
            assert missing == set(row["labels"]) - set(row["detected"])


def test_rescore_decides_again_without_the_image_encoder(filtered_run: Path, monkeypatch) -> None:
    before = decisions(filtered_run)

    def no_encoder(self, shard):  # a spy: rescoring must never reach the image encoder
        raise AssertionError("the image encoder ran during --rescore")

    def no_clip(*_):  # the text side was cached by the full run: rescoring needs no CLIP weights at all
        raise AssertionError("CLIP was loaded during --rescore with a cached text side")

    monkeypatch.setattr(FilterStage, "embed_shard", no_encoder)
    monkeypatch.setattr("mlgen.filters.stage.load_open_clip", no_clip)
    run = RunDir(filtered_run)
    workflow.filter_images(run, FilterConfig(clip="tiny", **NO_GATE), rescore=True)  # same settings: same decisions
    assert decisions(filtered_run) == before
    workflow.filter_images(run, FilterConfig(clip="tiny", threshold=0.0, **NO_GATE), rescore=True)
    lenient = decisions(filtered_run)
    assert [r["key"] for r in lenient] == [r["key"] for r in before]
    assert sum(r["kept"] for r in lenient) >= sum(r["kept"] for r in before)
    marker = run.success("filtered")
    assert marker is not None and marker["counts"]["kept"] == sum(r["kept"] for r in lenient)


def kept_per_set_and_shard(run: Path) -> Counter:
    """Kept images per (shard, label set), read from each shard's decisions (dedup works within a shard)."""
    counts: Counter = Counter()
    for path in sorted((run / "filtered").glob("*_decisions.parquet")):
        rows = pq.read_table(path).to_pylist()
        counts.update((path.name.split("_")[0], tuple(sorted(r["labels"]))) for r in rows if r["kept"])
    return counts


def test_dedup_drops_near_duplicates_within_a_label_set(tmp_path: Path) -> None:
    """The toy models (the tiny CLIP keeps too few images for two of one set): 18 images drawn over 3 sets."""
    (tmp_path / "classes.txt").write_text("circle\nsquare\n", encoding="utf-8")
    run = tmp_path / "run"
    generate = ["generate", "--classes", tmp_path / "classes.txt", "--model", "toy", "--llm", "template"]
    for args in ([*generate, "--denoising-steps", "10", "--images-per-prompt", "6"], ["filter", "--clip", "toy", *RULE_ONLY]):
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    lenient = kept_per_set_and_shard(run)
    assert max(lenient.values(), default=0) >= 2, lenient  # something for dedup to drop
    workflow.filter_images(RunDir(run), FilterConfig(clip="toy", dedup=1e-6, **NO_GATE), rescore=True)
    deduped = kept_per_set_and_shard(run)  # every positive cosine counts: one image per set and shard stays
    assert deduped == Counter(dict.fromkeys(lenient, 1))
    reasons = {r["reason"] for r in decisions(run) if not r["kept"]}
    assert "duplicate" in reasons


@pytest.mark.parametrize("text", ["ensemble", "s3"])
def test_rescore_with_another_text_side(filtered_run: Path, text: str, monkeypatch) -> None:
    monkeypatch.setattr(FilterStage, "embed_shard", lambda self, shard: pytest.fail("image encoder ran"))
    run = RunDir(filtered_run)
    before = decisions(filtered_run)
    synonyms = pq.read_table(filtered_run / "prompts" / "synonyms.parquet").to_pylist()  # generate ran prompts
    assert [(r["label"], r["synonym"]) for r in synonyms] == [(c, c) for c in ("zebra", "kite", "surfboard")]
    workflow.filter_images(run, FilterConfig(clip="tiny", text=text, **NO_GATE), rescore=True)
    after = decisions(filtered_run)
    assert [r["key"] for r in after] == [r["key"] for r in before]
    if text == "ensemble":
        assert [r["scores"] for r in after] != [r["scores"] for r in before]  # another text side, other scores
    else:  # each label's synonym space is the label alone: its local center is the bare name's embedding
        for old, new in zip(before, after, strict=True):
            assert new["scores"] == pytest.approx(old["scores"], abs=1e-4) and new["kept"] == old["kept"]
    assert all(r["kept"] == (r["reason"] == "") for r in after)
    workflow.filter_images(run, FilterConfig(clip="tiny", **NO_GATE), rescore=True)


def test_dedup_rule_compares_within_a_label_set_and_shard_only() -> None:
    stage = FilterStage.__new__(FilterStage)  # only the dedup rule: no run, no model
    stage.config = FilterConfig(clip="tiny", dedup=0.95)
    a, near, far = [1.0, 0.0], [0.99, 0.05], [0.0, 1.0]
    features = torch.nn.functional.normalize(torch.tensor([a, near, far, near, near, near]), dim=-1)
    requested = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    keys = [f"k{i}" for i in range(6)]
    stage.shard_of = dict(zip(keys, [0, 0, 0, 0, 1, 0], strict=True))
    kept = torch.tensor([True, True, True, True, True, False])
    duplicate = stage.duplicates(keys, features, kept, requested)
    # near repeats a (same set, shard); far does not; another label set, another shard and a dropped image never are
    assert duplicate.tolist() == [False, True, False, False, False, False]
    stage.config = FilterConfig(clip="tiny")  # off by default
    assert not stage.duplicates(keys, features, kept, requested).any()


def test_rescore_without_cached_embeddings_is_one_line(filtered_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(filtered_run, copy)
    shutil.rmtree(copy / "cache")
    done = mlgen("filter", "--run", copy, "--rescore", "--threshold", "0.2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "no cached image embeddings" in done.stderr
    assert (copy / "filtered" / "_SUCCESS.json").is_file()  # the earlier decisions are untouched


def test_a_raw_label_missing_from_classes_is_one_line(filtered_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(filtered_run, copy)
    (copy / "classes.txt").write_text("zebra\nkite\nboat\n", encoding="utf-8")
    done = mlgen("filter", "--run", copy, "--overwrite")
    assert done.returncode == 1 and "surfboard" in done.stderr and "is not in" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# Appended to a copy of the page: after load, record how many images there are and how many failed.
IMAGE_CHECK = (
    "<script>window.addEventListener('load', () => {const all = [...document.images];"
    "document.body.dataset.images = all.length;"
    "document.body.dataset.broken = all.filter(i => !i.complete || i.naturalWidth === 0).length;});</script>"
)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_page_shows_every_image_in_chromium(filtered_run: Path, tmp_path: Path) -> None:
    import re

    done = mlgen("report", "--run", filtered_run)
    assert done.returncode == 0, done.stderr
    page = filtered_run / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    for label in ("zebra", "kite", "surfboard"):
        assert f"<h2>{label}</h2>" in text
    prompts = text[text.index("<h2>Prompts</h2>") :]  # the prompt report: tables like the rest, no JSON dump
    assert "<pre>" not in prompts and "<th>template only (baseline)</th>" in prompts
    dom, screenshot = read_in_chromium(page, IMAGE_CHECK, tmp_path)
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    broken = int(re.search(r'data-broken="(\d+)"', dom).group(1))
    assert images >= 4 and broken == 0, (images, broken)
    assert screenshot.stat().st_size > 10_000


@pytest.mark.parametrize("workers", [2])
def test_decoding_in_workers_matches_one_process(filtered_run: Path, workers: int) -> None:
    from mlgen.filters.loader import decoded_batches
    from mlgen.models.registry import load_open_clip

    _, preprocess, _ = load_open_clip("tiny", torch.device("cpu"))
    raw = filtered_run / "raw"
    inline = list(decoded_batches(raw, 0, 3, preprocess, workers=0))
    parallel = list(decoded_batches(raw, 0, 3, preprocess, workers=workers))
    assert len(inline) >= 2  # more batches than one, so the workers' turns are exercised
    assert [[s["__key__"] for s in batch] for batch, _ in parallel] == [[s["__key__"] for s in b] for b, _ in inline]
    for (_, a), (_, b) in zip(inline, parallel, strict=True):
        assert torch.equal(a, b)


def test_an_empty_raw_stage_is_one_line(filtered_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(filtered_run, copy)
    prompts = copy / "prompts" / "prompts.parquet"
    pq.write_table(pq.read_table(prompts).slice(0, 0), prompts)  # no prompts: a raw stage of zero images
    steps_1 = [*FAST_GENERATE[: FAST_GENERATE.index("--denoising-steps")], "--denoising-steps", "1"]
    steps_1 += FAST_GENERATE[FAST_GENERATE.index("--denoising-steps") + 2 :]
    done = mlgen("generate", "--run", copy, *steps_1, "--overwrite")
    assert done.returncode == 0, done.stderr
    done = mlgen("filter", "--run", copy, "--overwrite")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "has no images" in done.stderr
