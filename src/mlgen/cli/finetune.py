"""``mlgen finetune``: the text encoder learns so that CLIP sees exactly the requested labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlgen.cli import renamed_flag
from mlgen.config import FinetuneConfig, read_config_file, stage_settings
from mlgen.labels import alias_setting, read_aliases
from mlgen.pipeline.rundir import RunDir


def _opt(*names: str, help: str) -> typer.models.OptionInfo:
    """An option (its MLGEN_FINETUNE_<KEY> variable is read by the stage's settings)."""
    return typer.Option(*names, help=help)


def finetune_command(
    run: Annotated[Path, typer.Option("--run", "--run-dir", envvar="MLGEN_RUN", help="Run directory.")] = Path(
        "mlgen-run"
    ),
    model: Annotated[
        str | None, _opt("--model", help="diffusers model id or folder; built in (named only): toy*, tiny.")
    ] = None,
    clip: Annotated[
        str | None, _opt("--clip", help="CLIP discriminator: open_clip ARCH/PRETRAINED, folder; toy*, tiny.")
    ] = None,
    learning_rate: Annotated[float | None, _opt("--learning-rate", help="AdamW learning rate (paper: 7e-8).")] = None,
    adam_weight_decay: Annotated[float | None, _opt("--adam-weight-decay", help="AdamW weight decay.")] = None,
    max_grad_norm: Annotated[float | None, _opt("--max-grad-norm", help="Gradient-norm clip.")] = None,
    lr_scheduler: Annotated[str | None, _opt("--lr-scheduler", help="constant, linear or cosine.")] = None,
    train_batch_size: Annotated[
        int | None, _opt("--train-batch-size", help="Images per optimizer step, over all processes.")
    ] = None,
    max_train_steps: Annotated[int | None, _opt("--max-train-steps", help="Optimizer steps.")] = None,
    denoising_steps: Annotated[
        int | None, _opt("--denoising-steps", help="Denoising steps per training image.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", hidden=True, help="Deprecated name.")] = None,
    size: Annotated[int | None, _opt("--size", help="Training image side in pixels.")] = None,
    guidance: Annotated[float | None, _opt("--guidance", help="Classifier-free guidance scale.")] = None,
    grad_steps: Annotated[
        int | None, _opt("--grad-steps", help="Backpropagate through only the last K denoising steps (default all).")
    ] = None,
    lora_rank: Annotated[
        int | None, _opt("--lora-rank", help="Train LoRA adapters of this rank instead of the whole text encoder.")
    ] = None,
    lora_alpha: Annotated[float | None, _opt("--lora-alpha", help="LoRA alpha (default: the rank).")] = None,
    seed: Annotated[int | None, _opt("--seed", help="Seed of prompts, noise and LoRA initialisation.")] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        _opt("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute UNet/VAE activations."),
    ] = None,
    mixed_precision: Annotated[
        str | None, _opt("--mixed-precision", help="auto (bf16/fp16 on CUDA, none on CPU), no, fp16, bf16.")
    ] = None,
    save_every: Annotated[
        int | None, _opt("--save-every", "--checkpointing-steps", help="Checkpoint every N steps.")
    ] = None,
    checkpoints_total_limit: Annotated[
        int | None, _opt("--checkpoints-total-limit", help="Checkpoints kept (the newest).")
    ] = None,
    log_every: Annotated[int | None, _opt("--log-every", help="A log.csv row every N steps.")] = None,
    label_aliases: Annotated[
        Path | None,
        _opt(
            "--label-aliases", help="Your names of labels ('label: alias, alias' lines or YAML); the loss reads them."
        ),
    ] = None,
    names_from: Annotated[
        Path | None,
        _opt(
            "--names-from",
            help="An earlier filtered run's reliability.json: the loss reads each label by its best name there "
            "(in place of the label; aliases are still averaged in).",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", envvar="MLGEN_CONFIG", help="YAML config file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again, dropping checkpoints.")] = False,
) -> None:
    """Fine-tune the diffusion model's text encoder with the CLIP-score loss (writes RUN/text_encoder/)."""
    files = ("label_aliases", "names_from")  # read below: their parsed contents are the settings
    flags = {
        k: v for k, v in locals().items() if k not in ("run", "config", "overwrite", "files", "denoising_steps", *files)
    }
    flags["steps"] = renamed_flag(denoising_steps, steps, "--steps", "--denoising-steps")
    if label_aliases is not None or names_from is not None:  # parsed against the run's labels (the prompt stage's)
        run_dir = RunDir(run)
        run_dir.require("prompts")
        aliases = read_aliases(label_aliases, run_dir.classes()) if label_aliases is not None else None
        flags["label_aliases"] = alias_setting(aliases)
        if names_from is not None:
            from mlgen.finetune.names import best_name_setting, read_best_names

            best = read_best_names(names_from, run_dir.classes(), aliases)
            flags["best_names"] = best_name_setting(best) or {}  # {}: every label by its own name, as without
    from mlgen.finetune.stage import finetune

    settings = stage_settings(FinetuneConfig, "finetune", read_config_file(config).get("finetune"), flags)
    marker = finetune(RunDir(run), settings, overwrite)
    if marker:
        counts = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in marker["counts"].items())
        typer.echo(f"finetune: done ({counts}); text encoder in {run / 'text_encoder'}, log in {run / 'finetune'}")
