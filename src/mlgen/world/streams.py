"""Named random streams of the toy world: every use of randomness draws from its own stream.

A stream is ``(name, seed, *keys)``. The name is hashed into the SeedSequence entropy and the seed and
keys go into its spawn key, so two streams never coincide: numpy hashes ``SeedSequence(k)`` like
``SeedSequence([k, 0])``, which made ``mlgen world render --seed 0`` redraw, byte for byte, the first
training batch of the shipped classic toy models. (Those models keep their legacy ``[seed, step]`` stream
so that their training stays reproducible; everything else uses a named stream.)
"""

from __future__ import annotations

import hashlib

import numpy as np

# Training streams of the toy models, the real data a run renders, and the experiment's own draws.
# ``val`` holds the scenes settings and checkpoints are chosen on (never ``test``); ``judge`` trains the filter
# audit's judge; ``splits`` draws the unseen label splits of ``mlgen experiment --splits``; ``probe`` the real
# scenes of every label the experiment's probe arm (its ceiling) trains on. A new name leaves the others' draws as
# they were (the name is hashed into the entropy).
STREAMS = (
    "train-clip",
    "train-vae",
    "train-unet",
    "test",
    "seen",
    "oracle",
    "experiment",
    "val",
    "judge",
    "splits",
    "probe",
)


def _entropy(name: str) -> int:
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}: use one of {STREAMS}")
    return int.from_bytes(hashlib.sha256(f"mlgen-world-stream:{name}".encode()).digest()[:16], "little")


def stream_sequence(name: str, seed: int, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of stream ``name`` for ``seed`` (and optional sub-keys such as a training step)."""
    if seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"stream seeds and keys must be >= 0, got {seed}, {keys}")
    return np.random.SeedSequence(_entropy(name), spawn_key=(int(seed), *map(int, keys)))


def stream_rng(name: str, seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator on stream ``name`` (see :func:`stream_sequence`)."""
    return np.random.default_rng(stream_sequence(name, seed, *keys))
