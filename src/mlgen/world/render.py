"""Procedural multi-label scenes of eight shapes on a noisy background, in two worlds.

- ``classic``: 1-3 large shapes that do not overlap, each class in its own colour. Easy on purpose:
  colour alone names the class, so tiny models learn it on a CPU in minutes (and a toy CLIP is perfect).
- ``headroom``: one large (salient) shape and up to three small ones, with colours SHARED in pairs
  (circle/ring red, square/diamond blue, triangle/star green, cross/heart purple), so shape must be
  learned and small objects are easy to miss: a CLIP trained on web-like captions is good but not perfect
  here, as web CLIP is on multi-label scenes (see ``mlgen.world.train_clip``).

Everything is drawn from the numpy Generator passed in: the same seed gives the same images.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mlgen.errors import MlgenError
from mlgen.paths import write_atomic

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart")
# One saturated colour per class, far from the grey backgrounds and from each other.
COLOURS = {
    "circle": ("red", (220, 30, 30)),
    "square": ("blue", (30, 70, 230)),
    "triangle": ("green", (30, 180, 50)),
    "star": ("yellow", (245, 215, 20)),
    "cross": ("purple", (140, 40, 200)),
    "ring": ("orange", (250, 130, 10)),
    "diamond": ("cyan", (20, 210, 220)),
    "heart": ("pink", (245, 90, 180)),
}
MAX_SHAPES = 3
# The headroom world's colours: one per PAIR of classes (shape, not colour, tells them apart).
SHARED_COLOURS = {
    "circle": COLOURS["circle"],
    "ring": COLOURS["circle"],
    "square": COLOURS["square"],
    "diamond": COLOURS["square"],
    "triangle": COLOURS["triangle"],
    "star": COLOURS["triangle"],
    "cross": COLOURS["cross"],
    "heart": COLOURS["cross"],
}


@dataclass(frozen=True)
class World:
    """How scenes are drawn: the class colours, how many shapes, and their sizes."""

    name: str
    colours: dict[str, tuple[str, tuple[int, int, int]]]
    max_shapes: int
    salient: bool  # one large shape and small others (web-like photos) instead of similar sizes


CLASSIC = World("classic", COLOURS, MAX_SHAPES, salient=False)
HEADROOM = World("headroom", SHARED_COLOURS, 4, salient=True)
WORLDS = {world.name: world for world in (CLASSIC, HEADROOM)}


def get_world(world: str | World) -> World:
    if isinstance(world, World):
        return world
    if world not in WORLDS:
        raise MlgenError(f"unknown toy world '{world}': use one of {', '.join(WORLDS)}")
    return WORLDS[world]


def _polygon(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
    draw.polygon(points, fill=colour)


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, colours: dict | None = None
) -> None:
    """Draw ``shape`` centred at (x, y) within radius ``r`` in its class colour (of ``colours``)."""
    if shape not in SHAPES:
        raise MlgenError(f"unknown shape '{shape}': the toy world has {', '.join(SHAPES)}")
    colour = (colours or COLOURS)[shape][1]
    box = [x - r, y - r, x + r, y + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([x - s, y - s, x + s, y + s], fill=colour)
    elif shape == "triangle":
        _polygon(draw, [(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            points.append((x + radius * math.sin(k * math.pi / 5), y - radius * math.cos(k * math.pi / 5)))
        _polygon(draw, points, colour)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle([x - r, y - w, x + r, y + w], fill=colour)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(r * 0.35)))
    elif shape == "diamond":
        _polygon(draw, [(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)], colour)
    elif shape == "heart":
        h = r / 2
        draw.ellipse([x - r, y - r * 0.8, x, y - r * 0.8 + r], fill=colour)
        draw.ellipse([x, y - r * 0.8, x + r, y - r * 0.8 + r], fill=colour)
        _polygon(draw, [(x - r * 0.97, y - h * 0.1), (x + r * 0.97, y - h * 0.1), (x, y + r)], colour)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey-ish tint with pixel noise (shapes must be told from texture, not from a flat field)."""
    base = rng.integers(70, 190) + rng.integers(-15, 16, size=3)
    noise = rng.normal(0.0, 14.0, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _radius(rng: np.random.Generator, size: int, index: int, salient: bool) -> float:
    if not salient:
        return size * rng.uniform(0.12, 0.2)
    # headroom: the first shape large (12-17 px at 64 px), the others small (4-7 px)
    return size * (rng.uniform(0.19, 0.27) if index == 0 else rng.uniform(0.0625, 0.11))


def _place(rng: np.random.Generator, count: int, size: int, salient: bool = False) -> list[tuple[float, float, float]]:
    """Centres and radii of ``count`` shapes that do not overlap (best effort after many tries)."""
    placed: list[tuple[float, float, float]] = []
    for index in range(count):
        for _attempt in range(50):
            r = _radius(rng, size, index, salient)
            x, y = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(x - px, y - py) > r + pr + 1 for px, py, pr in placed):
                break
        placed.append((float(x), float(y), float(r)))
    return placed


def caption_of(labels: list[str], colours: dict | None = None) -> str:
    phrases = [f"a {(colours or COLOURS)[label][0]} {label}" for label in labels]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def render_scene(
    rng: np.random.Generator, size: int = 64, labels: list[str] | None = None, world: str | World = CLASSIC
) -> tuple[np.ndarray, list[str], str]:
    """One scene: (uint8 HxWx3 image, the distinct shape classes in it, a caption naming them).

    ``labels`` restricts the classes drawn from (default: all of :data:`SHAPES`). In the headroom world the
    first label is the large, salient shape.
    """
    world = get_world(world)
    pool = list(labels or SHAPES)
    count = int(rng.integers(1, min(world.max_shapes, len(pool)) + 1))
    chosen = [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    for shape, (x, y, r) in zip(chosen, _place(rng, count, size, world.salient), strict=True):
        draw_shape(draw, shape, x, y, r, world.colours)
    return np.asarray(image), chosen, caption_of(chosen, world.colours)


def render_dataset(
    out: Path,
    n: int,
    seed: int,
    labels: list[str] | None = None,
    size: int = 64,
    world: str | World = CLASSIC,
    stream: str = "test",
) -> Path:
    """A labelled real image set: ``out/images/NNNNNN.png`` and ``out/labels.csv`` (image, labels joined by |).

    Scenes come from the named random ``stream`` (``test``, ``seen``, ``oracle``: see
    :mod:`mlgen.world.streams`), never from a toy model's training stream.
    """
    from mlgen.world.streams import stream_rng

    if labels is not None and (unknown := sorted(set(labels) - set(SHAPES))):
        raise MlgenError(f"unknown shapes {unknown}: the toy world has {', '.join(SHAPES)}")
    world = get_world(world)
    rng = stream_rng(stream, seed)
    rows = []
    for index in range(n):
        pixels, names, _ = render_scene(rng, size=size, labels=labels, world=world)
        name = f"images/{index:06d}.png"
        image = Image.fromarray(pixels)
        write_atomic(out / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
        rows.append({"image": name, "labels": "|".join(names)})

    def write_csv(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", "labels"])
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(out / "labels.csv", write_csv)  # last: a folder with labels.csv is complete
    return out
