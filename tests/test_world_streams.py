"""Seed hygiene: every random stream of the toy world is its own, so no real test, seen-label or oracle scene
is a training scene of a shipped toy model (which would make a held-out score a training score)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlgen.models.builtin import BUILTIN_MODELS
from mlgen.world.render import render_scene
from mlgen.world.streams import STREAMS, stream_rng, stream_sequence
from mlgen.world.train_sd import TrainSettings, training_generators

SCENES = 10_000
# The shipped models: (built-in name, world, model, batch, seed) of their training runs (README, "The toy world").
# toy-named's run draws the scenes of toy-headroom's (same stream, seed and batch; only captions differ);
# toy-headroom-2 went on from toy-headroom's UNet with seed 3 and trained a headroom decoder with seed 0.
SHIPPED = [("toy", "classic", "clip", 128, 0), ("toy", "classic", "vae", 32, 0), ("toy", "classic", "unet", 16, 0)]
SHIPPED += [("toy-headroom", "headroom", "clip", 128, 0), ("toy-headroom", "headroom", "unet", 16, 0)]
SHIPPED += [("toy-named", "headroom", "clip", 128, 0)]
SHIPPED += [("toy-headroom-2", "headroom", "unet", 16, 3), ("toy-headroom-2", "headroom", "vae", 32, 0)]


def scene_hash(rng: np.random.Generator, world: str) -> str:
    pixels, _, _ = render_scene(rng, world=world)
    return hashlib.sha1(pixels.tobytes()).hexdigest()


def training_hashes(world: str, model: str, batch: int, seed: int) -> set[str]:
    settings = TrainSettings(steps=1, batch=batch, seed=seed, extra={} if world == "classic" else {"world": world})
    hashes: set[str] = set()
    step = 0
    while len(hashes) < SCENES:
        rng, _ = training_generators(settings, model, step)
        hashes.update(scene_hash(rng, world) for _ in range(batch))
        step += 1
    return hashes


DATA_STREAMS = ("test", "seen", "oracle", "val", "judge")  # the rendered real sets an experiment reads


def data_hashes(stream: str, world: str, seed: int = 0) -> set[str]:
    rng = stream_rng(stream, seed)
    return {scene_hash(rng, world) for _ in range(SCENES)}


@pytest.mark.slow
@pytest.mark.parametrize("world", ["classic", "headroom"])
def test_no_test_seen_or_oracle_scene_is_a_training_scene_of_a_shipped_model(world: str) -> None:
    training = set().union(*(training_hashes(w, m, b, seed) for _, w, m, b, seed in SHIPPED if w == world))
    assert len(training) >= SCENES
    seen_before: dict[str, set[str]] = {}
    for stream in DATA_STREAMS:
        data = data_hashes(stream, world)
        assert len(data) > SCENES * 0.99  # the noisy background makes scenes distinct
        assert not data & training, f"{stream} scenes of the {world} world repeat training scenes"
        for other, hashes in seen_before.items():  # validation never sees a test scene, and so on
            assert not data & hashes, f"{stream} scenes of the {world} world repeat {other} scenes"
        seen_before[stream] = data


def test_every_built_in_model_is_in_the_shipped_list() -> None:
    """A built-in model missing from SHIPPED would have its training scenes go unchecked."""
    listed = {(name, world, "clip" if model == "clip" else "diffusion") for name, world, model, _, _ in SHIPPED}
    assert listed == {(m.name, m.world, m.kind) for m in BUILTIN_MODELS}


def test_the_legacy_alias_is_gone() -> None:
    """numpy hashes SeedSequence(0) like SeedSequence([0, 0]): the old test seed 0 was training step 0."""
    legacy = np.random.default_rng(0).integers(0, 2**32, 8)
    classic_step0, _ = training_generators(TrainSettings(steps=1), "clip", 0)
    assert np.array_equal(legacy, classic_step0.integers(0, 2**32, 8))  # the alias the old code fell into
    for name in STREAMS:
        assert not np.array_equal(legacy, stream_rng(name, 0).integers(0, 2**32, 8)), name


def test_streams_differ_by_name_seed_and_key_and_repeat_exactly() -> None:
    draws = {
        (name, seed, key): tuple(stream_rng(name, seed, key).integers(0, 2**32, 4))
        for name in STREAMS
        for seed in (0, 1)
        for key in (0, 1)
    }
    assert len(set(draws.values())) == len(draws)
    assert tuple(stream_rng("test", 1, 0).integers(0, 2**32, 4)) == draws[("test", 1, 0)]
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_sequence("tset", 0)
