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

# Scenes rendered per set in the scene-level check: a sample. The start-state check below covers every training
# step at its real size (and twice it), every experiment seed and label order, and implies the scene-level one.
SCENES = 2_000
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


DATA_STREAMS = ("test", "seen", "oracle", "val", "judge", "probe")  # the rendered real sets an experiment reads


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


# Every shipped training run at its real size, (world, model, seed, steps, batch), from the commands in the README's
# "The toy world": a step draws its scenes from its own generator, (seed, step) alone. toy-headroom's UNet trained
# in three runs of 900, 600 and 800 steps, each from step 0 of its own work folder (the largest covers the others);
# toy-headroom-2's UNet went on for 4,500 steps with seed 3 (72,000 scenes) and its decoder 600 steps with seed 0.
TRAINING_RUNS = [
    ("classic", "clip", 0, 600, 128),
    ("classic", "vae", 0, 700, 32),
    ("classic", "unet", 0, 1900, 16),
    ("headroom", "clip", 0, 300, 128),  # toy-headroom and toy-named (the same scenes, other captions)
    ("headroom", "unet", 0, 900, 16),
    ("headroom", "unet", 3, 4500, 16),
    ("headroom", "vae", 0, 600, 32),
]
# The experiment's seeds: the old 0-9, the headline 10-19, the done-when 20-22 and more, and the tuning seeds 1000+.
EXPERIMENT_SEEDS = [*range(50), *range(1000, 1050)]
STEP_MARGIN = 2  # each run's steps are checked to twice their count


def _state(rng: np.random.Generator) -> tuple[int, int]:
    state = rng.bit_generator.state["state"]
    return int(state["state"]), int(state["inc"])


class _Drawn(Exception):
    pass


def experiment_draws(tmp_path, monkeypatch) -> dict[tuple[str, int], tuple[int, int]]:
    """The generator state each real set of the experiment starts from, per (stream, seed), taken from the
    experiment's own data functions (every split's label order, both rendering worlds): rendering is stopped at
    its first scene, so nothing is drawn but the start."""
    from mlgen.config import ExperimentConfig
    from mlgen.experiment import audit
    from mlgen.experiment import data as experiment_data
    from mlgen.experiment.cells import Context
    from mlgen.experiment.runner import split_labels
    from mlgen.world import render

    seen: dict[tuple[str, int], tuple[int, int]] = {}
    current: list[str] = []

    def first_scene(rng, *args, **kwargs):
        key = (current[0], current[1])
        state = _state(rng)
        assert seen.setdefault(key, state) == state, f"{key} starts from two states"
        raise _Drawn

    monkeypatch.setattr(render, "render_scene", first_scene)
    functions = {
        "test": experiment_data.test_set,
        "val": experiment_data.val_set,
        "seen": experiment_data.seen_set,
        "oracle": experiment_data.oracle_set,
        "probe": experiment_data.probe_set,
    }
    for world in ("toy", "toy-classic"):
        base = ExperimentConfig(world=world, unseen="circle,triangle,star,heart", splits=3)
        for unseen in split_labels(base):
            config = ExperimentConfig(world=world, unseen=",".join(unseen))
            setup = experiment_data.resolve(config)
            for seed in EXPERIMENT_SEEDS:
                for stream, function in functions.items():
                    current[:] = [stream, seed]
                    with pytest.raises(_Drawn):
                        function(config, setup, tmp_path / world, seed)
                current[:] = ["judge", seed]
                with pytest.raises(_Drawn):
                    audit.judge_data(Context(tmp_path / world, config, setup, None), seed)
    return {(stream, seed): state for (stream, seed), state in seen.items()}


def test_no_experiment_draw_starts_where_a_training_step_or_another_draw_does(tmp_path, monkeypatch) -> None:
    """For every seed and label order the experiment uses, each real set (test, val, seen, oracle, probe, judge)
    starts from its own generator state, unlike any training step of a shipped model at its real size (and twice
    it). A rendered set and a training batch are PCG64 draws; two sequences from different starting states share
    no scene unless one reaches the other's start, which for 128-bit states and these lengths has a probability
    below 1e-25. So distinct starts imply the scene-level check above for every seed, split and training scene."""
    draws = experiment_draws(tmp_path, monkeypatch)
    assert {stream for stream, _ in draws} == {"test", "val", "seen", "oracle", "probe", "judge"}
    assert len(draws) == 6 * len(EXPERIMENT_SEEDS)
    assert len(set(draws.values())) == len(draws), "two of the experiment's sets start from the same state"
    training: dict[tuple[int, int], tuple] = {}
    for world, model, seed, steps, batch in TRAINING_RUNS:
        settings = TrainSettings(steps=1, batch=batch, seed=seed, extra={} if world == "classic" else {"world": world})
        for step in range(steps * STEP_MARGIN):
            rng, _ = training_generators(settings, model, step)
            training[_state(rng)] = (world, model, seed, step)
    clashes = {key: training[state] for key, state in draws.items() if state in training}
    assert not clashes, f"experiment sets start where a training step does: {clashes}"
