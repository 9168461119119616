"""``mlgen experiment``: the paper's comparisons on one real test set, paired by seed (mlgen.experiment)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mlgen.config import ClassifierConfig, ExperimentConfig, build_config, env_settings, read_config_file
from mlgen.experiment.arms import ARMS

ARM_HELP = "ALL or a comma-separated subset of: " + ", ".join(arm.name for arm in ARMS)


def _joined(value: Any) -> Any:
    """A YAML list of labels as the comma-separated form the flags use."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def experiment_command(
    run: Annotated[Path, typer.Option("--run", "--run-dir", envvar="MLGEN_RUN", help="Run directory.")] = Path(
        "mlgen-run"
    ),
    world: Annotated[
        str | None,
        typer.Option(
            help="toy (headroom world), toy-named (its teacher knows every name), toy-classic, none (your --data)."
        ),
    ] = None,
    unseen: Annotated[str | None, typer.Option(help="Comma-separated unseen labels (generated).")] = None,
    seen: Annotated[str | None, typer.Option(help="Comma-separated seen labels (default: the rest).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds (paired across arms).")] = None,
    first_seed: Annotated[
        int | None, typer.Option(min=0, help="First seed: runs seeds N..N+seeds-1 (recorded; a DIR holds one range).")
    ] = None,
    splits: Annotated[
        int | None, typer.Option(help="Unseen-label splits: --unseen, then others drawn from the toy world.")
    ] = None,
    arms: Annotated[str | None, typer.Option(help=ARM_HELP)] = None,
    data: Annotated[str | None, typer.Option(help="Your real test set (CSV, COCO JSON or WebDataset).")] = None,
    seen_data: Annotated[str | None, typer.Option(help="Your real images of the seen labels.")] = None,
    oracle_data: Annotated[str | None, typer.Option(help="Your real images of the unseen labels (oracle).")] = None,
    probe_data: Annotated[str | None, typer.Option(help="Your real images of every label (probe).")] = None,
    clip: Annotated[str | None, typer.Option(help="Teacher CLIP (default: the world's).")] = None,
    model: Annotated[str | None, typer.Option(help="Text-to-image model (default: the world's).")] = None,
    llm: Annotated[str | None, typer.Option(help="Prompt LLM: smollm2, template, ...")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs of every trained arm (a real, a synthetic pass).")
    ] = None,
    pass_steps: Annotated[
        int | None, typer.Option(min=1, help="Optimizer steps of every pass (equal steps per pass kind in every arm).")
    ] = None,
    val_data: Annotated[
        str | None, typer.Option(help="Your validation images (checkpoint selection; the toy world renders them).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Seeds run at once, a process each (default: one per core on the toy world).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", envvar="MLGEN_CONFIG", help="YAML config file.")] = None,
) -> None:
    """Arms (zero-shot, s3, seen-only, paper, text-embedding-head, mlgen, ablations, oracle) under like-for-like
    rules, paired by seed: RUN/experiment/results.csv, summary.json, table.md, plot.png. Resumable per cell."""
    from mlgen.experiment import run_experiment

    sections = read_config_file(config)
    section = {k: _joined(v) for k, v in (sections.get("experiment") or {}).items()}
    flags = dict(world=world, unseen=unseen, seen=seen, seeds=seeds, arms=arms, data=data, seen_data=seen_data)
    flags.update(
        oracle_data=oracle_data,
        probe_data=probe_data,
        clip=clip,
        model=model,
        llm=llm,
        workers=workers,
        val_data=val_data,
    )
    flags.update(epochs=epochs, pass_steps=pass_steps, splits=splits, first_seed=first_seed)
    settings = build_config(ExperimentConfig, section, env_settings("experiment"), flags)
    if settings.world is not None and settings.world.lower() == "none":  # your own data and models
        settings = dataclasses.replace(settings, world=None)
    classifier = build_config(ClassifierConfig, sections.get("classifier")) if "classifier" in sections else None
    started = time.time()
    run_experiment(run, settings, classifier, log=typer.echo)
    typer.echo(f"\nmlgen experiment finished in {time.time() - started:.0f} s. Outputs in {run}/experiment/:")
    typer.echo((run / "experiment" / "table.md").read_text(encoding="utf-8"))
