"""The toy world's renderer: deterministic scenes whose labels match their pixels, and the CSV test set."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import mlgen
from mlgen.errors import MlgenError
from mlgen.world.render import COLOURS, SHAPES, SHARED_COLOURS, render_dataset, render_scene


def colour_pixels(image: np.ndarray, shape: str, tolerance: int = 30) -> int:
    """Pixels within ``tolerance`` (per channel) of ``shape``'s class colour."""
    target = np.array(COLOURS[shape][1])
    return int((np.abs(image.astype(int) - target) <= tolerance).all(axis=-1).sum())


def test_the_vocabulary_has_one_distinct_colour_per_class() -> None:
    assert len(SHAPES) == 8
    colours = [COLOURS[s][1] for s in SHAPES]
    assert len(set(colours)) == len(colours)
    assert len({COLOURS[s][0] for s in SHAPES}) == len(SHAPES)


def test_same_seed_same_scenes_other_seed_other_scenes() -> None:
    def scenes(seed: int):
        rng = np.random.default_rng(seed)
        return [render_scene(rng) for _ in range(20)]

    first, again, other = scenes(3), scenes(3), scenes(4)
    for (a, la, ca), (b, lb, cb) in zip(first, again, strict=True):
        assert np.array_equal(a, b) and la == lb and ca == cb
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_labels_match_the_pixels_and_the_caption_names_them() -> None:
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(200):
        image, labels, caption = render_scene(rng)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
        counts.add(len(labels))
        for shape in SHAPES:
            present = colour_pixels(image, shape)
            if shape in labels:
                assert present >= 20, (shape, labels)
                assert shape in caption
            else:
                assert present <= 2, (shape, labels)  # no other class's colour (noise may graze one pixel)
    assert counts == {1, 2, 3}


def test_render_dataset_writes_a_readable_csv(tmp_path: Path) -> None:
    out = render_dataset(tmp_path / "real", 12, seed=5, labels=["circle", "star", "heart"])
    with (out / "labels.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    for row in rows:
        image = np.asarray(Image.open(out / row["image"]))
        labels = row["labels"].split("|")
        assert image.shape == (64, 64, 3)
        assert set(labels) <= {"circle", "star", "heart"}
        assert all(colour_pixels(image, shape) >= 20 for shape in labels)


def test_cli_renders_a_test_set(tmp_path: Path) -> None:
    done = mlgen("world", "render", "--n", "5", "--out", tmp_path / "set", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "set" / "labels.csv").read_text(encoding="utf-8").splitlines()) == 6


def test_unknown_shapes_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MlgenError, match="unicorn"):
        render_dataset(tmp_path / "bad", 5, seed=0, labels=["circle", "unicorn"])
    assert not (tmp_path / "bad" / "labels.csv").exists()


def test_headroom_world_shares_colours_in_pairs_and_draws_one_salient_shape() -> None:
    assert {SHARED_COLOURS[a] == SHARED_COLOURS[b] for a, b in PAIRS} == {True}
    assert len({SHARED_COLOURS[s] for s in SHAPES}) == 4
    rng = np.random.default_rng(11)
    counts = set()
    for _ in range(200):
        image, labels, _ = render_scene(rng, world="headroom")
        counts.add(len(labels))
        salient = shared_colour_pixels(image, labels[0])
        assert salient >= 150  # the salient shape is large (radius >= 12 px)
        for shape in labels[1:]:
            if PARTNER[shape] not in labels:  # a small shape whose colour no other shape of the scene shares
                assert 10 <= shared_colour_pixels(image, shape) < salient
    assert counts == {1, 2, 3, 4}


def test_headroom_scenes_come_from_their_own_stream(tmp_path: Path) -> None:
    test = render_dataset(tmp_path / "t", 4, seed=0, world="headroom", stream="test")
    seen = render_dataset(tmp_path / "s", 4, seed=0, world="headroom", stream="seen")
    first = [(out / "images" / "000000.png").read_bytes() for out in (test, seen)]
    assert first[0] != first[1]
    done = mlgen("world", "render", "--n", "2", "--out", tmp_path / "bad", "--world", "cubist")
    assert done.returncode != 0 and "unknown toy world 'cubist'" in done.stderr and "Traceback" not in done.stderr


PAIRS = [("circle", "ring"), ("square", "diamond"), ("triangle", "star"), ("cross", "heart")]
PARTNER = {a: b for pair in PAIRS for a, b in (pair, pair[::-1])}


def shared_colour_pixels(image: np.ndarray, shape: str, tolerance: int = 30) -> int:
    target = np.array(SHARED_COLOURS[shape][1])
    return int((np.abs(image.astype(int) - target) <= tolerance).all(axis=-1).sum())
