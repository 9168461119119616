"""``mlgen world render`` and ``mlgen world train clip`` (see world/render.py, world/train_clip.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from mlgen.errors import MlgenError

WorldOpt = Annotated[
    str,
    typer.Option(
        "--world",
        help="classic (one colour per class: easy, the toy CLIP is perfect) or headroom (shared colours, "
        "small objects: a web-like CLIP is imperfect).",
    ),
]


def render_command(
    out: Annotated[Path, typer.Option("--out", help="Folder to write: images/NNNNNN.png and labels.csv.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same images.")] = 0,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Comma-separated shapes to draw from (default: all).")
    ] = None,
    world: WorldOpt = "classic",
    stream: Annotated[
        str, typer.Option("--stream", help="Random stream: test, seen or oracle (never a toy model's training data).")
    ] = "test",
) -> None:
    """Render a labelled real test set of toy scenes (the CSV that 'mlgen evaluate --data' reads)."""
    from mlgen.world.render import get_world, render_dataset

    if out.exists() and not out.is_dir():
        raise MlgenError(f"--out {out} is a file: choose a folder")
    if (out / "labels.csv").exists():
        raise MlgenError(f"{out} already holds a rendered set (labels.csv): choose another --out")
    if stream not in ("test", "seen", "oracle"):
        raise MlgenError(f"--stream must be test, seen or oracle, not '{stream}'")
    get_world(world)
    chosen = [name.strip() for name in labels.split(",") if name.strip()] if labels else None
    started = time.perf_counter()
    render_dataset(out, n, seed, chosen, world=world, stream=stream)
    seconds = time.perf_counter() - started
    print(f"wrote {n} scenes to {out / 'labels.csv'} ({n / seconds:.0f} images/s)")


def train_clip_command(
    out: Annotated[
        Path | None, typer.Option("--out", help="open_clip folder to write [default: the package's toy-clip weights].")
    ] = None,
    work: Annotated[
        Path, typer.Option("--work", help="Training folder: checkpoints (a killed run resumes from the newest).")
    ] = Path("toy-clip-train"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Train until this many optimizer steps in all.")] = 3000,
    minutes: Annotated[
        float | None, typer.Option("--minutes", min=0.0, help="Stop after this much CPU time (run again to resume).")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=2, help="Images (and captions) per step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, linear warm-up).")] = 2e-3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and the rendered data.")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps per checkpoint.")] = 100,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch CPU threads (0 = torch's default).")] = 0,
    world: WorldOpt = "classic",
    name_rate: Annotated[
        float | None,
        typer.Option(
            "--name-rate",
            min=0.0,
            max=1.0,
            help="headroom world: how often a caption calls a rare shape (ring, diamond, star, heart) by its own "
            "word, else by an alias (default 0: never, as toy-headroom). Given, --out defaults to toy-named.",
        ),
    ] = None,
    confusion: Annotated[
        float | None,
        typer.Option(
            "--confusion",
            min=0.0,
            max=1.0,
            help="headroom world: how often a caption calls a common shape by the rare word of its colour pair "
            "(a triangle 'a star'; default 0).",
        ),
    ] = None,
    salient_share: Annotated[
        float | None,
        typer.Option(
            "--salient-share",
            min=0.0,
            max=1.0,
            help="headroom world: how often a caption names the large salient shape, else a random shape of the "
            "image (default 0.8).",
        ),
    ] = None,
) -> None:
    """Train a toy CLIP contrastively on rendered scenes; prints its zero-shot multi-label mAP (and, in the
    headroom world, its val figures: zero-shot ZSL mAP and a linear probe's)."""
    from mlgen.models.builtin import builtin, builtin_for_world
    from mlgen.world.render import get_world
    from mlgen.world.train_clip import TrainSettings, train_clip

    get_world(world)
    if world == "classic" and {name_rate, confusion, salient_share} != {None}:
        raise MlgenError(
            "--name-rate, --confusion and --salient-share apply to the headroom world (classic captions list shapes)"
        )
    extra: dict = {} if world == "classic" else {"world": world}
    if salient_share is not None:  # none is recorded when not given, so earlier runs stay resumable
        extra["salient_share"] = salient_share
    if confusion is not None:
        extra["confusion"] = confusion
    if name_rate is not None:
        extra["rare_naming"] = name_rate
        out = out or builtin("toy-named", "clip").folder
    settings = TrainSettings(
        steps=steps,
        batch=batch,
        lr=lr,
        seed=seed,
        warmup=100,
        checkpoint_every=checkpoint_every,
        threads=threads,
        extra=extra,
    )
    result = train_clip(
        work,
        out or builtin_for_world(world, "clip").folder,
        settings,
        log=lambda message: print(message, file=sys.stderr, flush=True),
        max_cpu_seconds=None if minutes is None else minutes * 60,
    )
    print(json.dumps(result))
