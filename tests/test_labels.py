"""``--label-aliases FILE``: both formats read alike, every class gets a key, each bad input is one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlgen.errors import MlgenError
from mlgen.labels import alias_setting, aliases_from_mapping, names_of, parse_aliases, read_aliases

CLASSES = ["circle", "triangle", "star", "heart", "hair drier"]
EXPECTED = {
    "circle": [],
    "triangle": [],
    "star": ["sparkle", "twinkle"],
    "heart": ["love symbol"],
    "hair drier": ["hair dryer", "blow dryer"],
}


def test_lines_and_yaml_give_the_same_aliases() -> None:
    lines = "star: sparkle, Twinkle\nheart: love   symbol\nHair Drier: hair dryer, blow dryer, hair dryer\n"
    yaml_lists = (
        "star: [sparkle, twinkle]\n"
        "heart:\n  - love symbol\n"
        "hair drier:\n  - hair dryer\n  - blow dryer\n"
        "circle: []\n"
        "triangle: triangle\n"  # its own name is no alias
    )
    assert parse_aliases(lines, "a.txt", CLASSES) == EXPECTED
    assert parse_aliases(yaml_lists, "a.yaml", CLASSES) == EXPECTED
    assert list(parse_aliases(lines, "a.txt", CLASSES)) == CLASSES  # every class, in class order
    assert parse_aliases("", "empty.txt", CLASSES) == {label: [] for label in CLASSES}
    assert parse_aliases("# only a comment\n", "c.txt", CLASSES) == {label: [] for label in CLASSES}


def test_the_setting_keeps_only_labels_with_aliases_and_is_read_back_alike() -> None:
    setting = alias_setting(EXPECTED)
    assert setting == {"star": ["sparkle", "twinkle"], "heart": ["love symbol"], "hair drier": EXPECTED["hair drier"]}
    assert alias_setting({label: [] for label in CLASSES}) is None and alias_setting(None) is None
    assert aliases_from_mapping(setting, "config", CLASSES) == EXPECTED  # a recorded setting validates as a file
    assert names_of("star", {"star": ["shooting star"]}, EXPECTED) == ["star", "shooting star", "sparkle", "twinkle"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("moon: crescent\n", r"'moon' is not one of the labels \(circle, triangle"),  # unknown label
        ("star: sparkle, Heart\n", "alias 'heart' of 'star' is another label"),
        ("star: [sparkle, hair  drier]\n", "alias 'hair drier' of 'star' is another label"),
        ("star: sparkle, bling\nheart: bling\n", "alias 'bling' is given for both 'star' and 'heart'"),
        ("star: sparkle,, twinkle\n", "'star' has an empty alias"),
        ("star:\n", "the aliases of 'star' must be a comma-separated line or a list of names"),
        ("star: {a: b}\n", "the aliases of 'star' must be"),
        ("star: sparkle\nheart: [love: symbol]\n", "the aliases of 'heart' must be"),
        ("- star\n- heart\n", "expected 'label: alias, alias' lines or a YAML mapping, got list"),
        ("just some words\n", "got str"),
        ("star: sparkle\n  heart: [love\n", r"a.txt:\d+: not 'label: alias, alias' lines or a YAML mapping"),
    ],
)
def test_each_bad_aliases_text_is_one_error(text: str, message: str) -> None:
    with pytest.raises(MlgenError, match=message):
        parse_aliases(text, "a.txt", CLASSES)


def test_read_aliases_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MlgenError, match=r"aliases file not found: .*nope\.txt"):
        read_aliases(tmp_path / "nope.txt", CLASSES)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"star: \xe9toile\n")
    with pytest.raises(MlgenError, match=r"latin.txt is not UTF-8 text \(byte 6\)"):
        read_aliases(latin, CLASSES)
    good = tmp_path / "aliases.txt"
    good.write_bytes("\ufeffheart: love symbol\n".encode())  # a BOM, as Windows editors write
    assert read_aliases(good, CLASSES)["heart"] == ["love symbol"]
