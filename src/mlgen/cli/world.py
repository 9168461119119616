"""``mlgen world``: the toy world (procedural scenes and the tiny models trained on them)."""

from __future__ import annotations

import typer

from mlgen.cli.world_clip import render_command, train_clip_command
from mlgen.cli.world_train import train_unet_command, train_vae_command

world_app = typer.Typer(name="world", help="The toy world: rendered scenes and the toy models.", no_args_is_help=True)
train_app = typer.Typer(name="train", help="Train the toy models (seeded, resumable).", no_args_is_help=True)
world_app.add_typer(train_app)
world_app.command("render")(render_command)
train_app.command("clip")(train_clip_command)
train_app.command("vae")(train_vae_command)
train_app.command("unet")(train_unet_command)
