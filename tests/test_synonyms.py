"""Synonyms must be words: repetitions, the label glued to more letters and non-words are refused,
real spelling variants are kept (issue 17: MiniLM rates misspellings such as 'zebrass' close to the label)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

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
