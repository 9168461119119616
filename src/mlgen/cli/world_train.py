"""``mlgen world train vae`` / ``mlgen world train unet``: the toy text-to-image model (see world/train_sd.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

WorkOpt = Annotated[
    Path,
    typer.Option("--work", help="Training folder: checkpoints (a killed run resumes from the newest) and vae/."),
]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Train until this many optimizer steps in all.")]
BatchOpt = Annotated[
    int | None, typer.Option("--batch", min=1, help="Images per step (default: 64 on CPU, 256 on CUDA).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the weights, the rendered data and the noise.")]
EveryOpt = Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="torch CPU threads (0 = torch's default).")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, linear warm-up).")]
WorldOpt = Annotated[str, typer.Option("--world", help="The toy world to draw: classic or headroom.")]
DEFAULT_WORK = Path("toy-sd-train")


def _settings(steps: int, batch: int | None, lr: float, seed: int, every: int, threads: int, world: str, **extra):
    from mlgen.world.render import get_world
    from mlgen.world.train_sd import TrainSettings, pick_device

    get_world(world)
    if batch is None:
        batch = 256 if pick_device().type == "cuda" else 64
    extra = {k: v for k, v in extra.items() if v is not None}
    if world != "classic":
        extra["world"] = world
    return TrainSettings(
        steps=steps, batch=batch, lr=lr, seed=seed, checkpoint_every=every, threads=threads, extra=extra
    )


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_vae_command(
    work: WorkOpt = DEFAULT_WORK,
    steps: StepsOpt = 1500,
    batch: BatchOpt = None,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    checkpoint_every: EveryOpt = 100,
    threads: ThreadsOpt = 0,
    world: WorldOpt = "classic",
    init: Annotated[
        str | None,
        typer.Option("--init", help="Start from this pipeline's VAE (a folder, or a built-in name such as toy)."),
    ] = None,
    decoder_only: Annotated[
        bool,
        typer.Option(
            "--decoder-only",
            help="Train the decoder alone (needs --init): the latents, and so the pipeline's UNet, stay valid.",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the --init pipeline with the new VAE to this folder.")
    ] = None,
) -> None:
    """Train the toy VAE (64 px scenes -> 16x16x4 latents) into WORK/vae; prints its PSNR."""
    import json

    from mlgen.errors import MlgenError
    from mlgen.models.registry import diffusers_folder
    from mlgen.world.train_sd import train_vae

    if (decoder_only or out) and not init:
        raise MlgenError("--decoder-only and --out need --init (the pipeline whose VAE to go on from)")
    start = diffusers_folder(init) if init else None
    flags = {"init": start, "decoder_only": True if decoder_only else None}  # None: not recorded
    settings = _settings(steps, batch, lr, seed, checkpoint_every, threads, world, **flags)
    result = train_vae(work, settings, log=_print, out=out)
    print(json.dumps(result))


def train_unet_command(
    work: WorkOpt = DEFAULT_WORK,
    out: Annotated[
        Path | None, typer.Option("--out", help="Pipeline folder to write [default: the package's toy-sd weights].")
    ] = None,
    steps: StepsOpt = 3000,
    batch: BatchOpt = None,
    lr: LrOpt = 5e-4,
    seed: SeedOpt = 0,
    checkpoint_every: EveryOpt = 100,
    threads: ThreadsOpt = 0,
    world: WorldOpt = "classic",
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start from this pipeline (a folder, or a built-in name such as toy): its VAE "
            "(unless WORK/vae exists), UNet and text encoder.",
        ),
    ] = None,
    ema_decay: Annotated[
        float, typer.Option("--ema-decay", min=0.0, max=1.0, help="Decay of the exported EMA weights.")
    ] = 0.999,
    warmup: Annotated[int, typer.Option("--warmup", min=1, help="Linear learning-rate warm-up steps.")] = 100,
) -> None:
    """Train the toy UNet and text encoder on WORK/vae; export the pipeline (also at every checkpoint)."""
    import json

    from mlgen.models.builtin import builtin_for_world
    from mlgen.models.registry import diffusers_folder
    from mlgen.world.train_sd import train_unet

    start = diffusers_folder(init) if init else None
    decay = None if ema_decay == 0.999 else ema_decay  # the default is not recorded (old runs stay resumable)
    settings = _settings(steps, batch, lr, seed, checkpoint_every, threads, world, init=start, ema_decay=decay)
    settings.warmup = warmup
    result = train_unet(work, out or builtin_for_world(world, "diffusion").folder, settings, log=_print)
    print(json.dumps(result))
