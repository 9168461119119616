"""``mlgen models``: the generation presets and the values each one sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlgen.errors import MlgenError


def models_command() -> None:
    """List the sampling presets (chosen by model id, or with --preset) and their values."""
    from mlgen.generate.diffusion import SCHEDULERS
    from mlgen.generate.presets import PRESET_FIELDS, presets

    for name, preset in presets().items():
        values = "  ".join(f"{field} {preset.get(field) if preset.get(field) is not None else 'native'}"
                           for field in PRESET_FIELDS)  # fmt: skip
        matches = ", ".join(preset.get("names", []) + preset.get("match", [])) or "any other model"
        typer.echo(f"{name:<9} {values}")
        typer.echo(f"{'':<9} {preset['description']}; matches: {matches}")
    typer.echo(f"schedulers: {', '.join(SCHEDULERS)}")


def export_command(
    folder: Annotated[Path, typer.Argument(help="A shard folder: RUN/raw or RUN/filtered.")],
    out: Annotated[Path | None, typer.Argument(help="Output file (coco).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="coco (label JSON) or sizes (sizes.json in FOLDER).")] = "coco",
) -> None:
    """Export a shard folder: COCO-style labels (with per-label confidences once filtered), or sizes.json."""
    from mlgen.pipeline.rundir import RunDir

    if fmt not in ("coco", "sizes"):
        raise MlgenError(f"--format must be coco or sizes, not {fmt!r}")
    if not folder.is_dir():
        raise MlgenError(f"no shard folder at {folder}" + (" (it is a file)" if folder.exists() else ""))
    if fmt == "coco" and out is None:
        raise MlgenError("mlgen export --format coco needs an output file: mlgen export RUN/filtered OUT.json")
    classes: list[str] = []
    if fmt == "coco":  # the run's labels name the categories
        run = RunDir(folder.parent)
        if not run.classes_file.is_file():
            raise MlgenError(f"{folder.parent} has no classes.txt: FOLDER must be a run's raw or filtered folder")
        classes = run.classes()
    from mlgen.generate.export import export  # after the checks: it loads webdataset, which loads torch

    counts = export(folder, out or folder / "sizes.json", fmt, classes)
    typer.echo(f"export {fmt}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" -> {out or folder}")
