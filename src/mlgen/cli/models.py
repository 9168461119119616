"""``mlgen models``: the generation presets and the values each one sets."""

from __future__ import annotations

import typer

from mlgen.generate.diffusion import SCHEDULERS
from mlgen.generate.presets import PRESET_FIELDS, presets


def models_command() -> None:
    """List the sampling presets (chosen by model id, or with --preset) and their values."""
    for name, preset in presets().items():
        values = "  ".join(f"{field} {preset.get(field) if preset.get(field) is not None else 'native'}"
                           for field in PRESET_FIELDS)  # fmt: skip
        matches = ", ".join(preset.get("names", []) + preset.get("match", [])) or "any other model"
        typer.echo(f"{name:<9} {values}")
        typer.echo(f"{'':<9} {preset['description']}; matches: {matches}")
    typer.echo(f"schedulers: {', '.join(SCHEDULERS)}")
