"""The ``mlgen`` command line: thin typer commands that resolve settings and call :mod:`mlgen.workflow`."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mlgen import __version__
from mlgen.cli import renamed_flag
from mlgen.cli.bench import bench_command
from mlgen.cli.experiment import experiment_command
from mlgen.cli.finetune import finetune_command
from mlgen.cli.models import export_command, models_command
from mlgen.cli.prompts import prompts_command
from mlgen.cli.world import world_app
from mlgen.config import (
    PAPER_FILTER_CLIP,
    STAGE_CONFIGS,
    ClassifierConfig,
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    PromptsConfig,
    build_config,
    env_settings,
    read_config_file,
    stage_settings,
    warn_unknown_env,
)
from mlgen.errors import MlgenError
from mlgen.labels import read_labels
from mlgen.lazy import LazyModule
from mlgen.pipeline.rundir import RunDir

try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer: click itself
    from click import exceptions as click_exceptions
workflow = LazyModule("mlgen.workflow")  # torch and the models load when a command needs them
NO_ARGS_IS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; () matches nothing

# `mlgen --help` groups the commands in panels, each in the order a run uses them.
PIPELINE, INSPECT, SCALE, RESEARCH = "Pipeline", "Inspect", "Scale", "Research"
PIPELINE_ORDER = ("prompts", "finetune", "generate", "filter", "train-classifier", "evaluate", "predict")
# The config section whose defaults a command's options show, and option names that differ from the keys.
COMMAND_SECTIONS = {
    "prompts": "prompts",
    "finetune": "finetune",
    "generate": "generate",
    "filter": "filter",
    "train-classifier": "classifier",
    "experiment": "experiment",
}
CONFIG_KEYS = {
    "denoising_steps": "steps",
    "train_steps": "steps",
    "synonyms": "synonyms_per_label",
    "compile_unet": "compile",
}


class MlgenGroup(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
        return sorted(names, key=lambda name: rank.get(name, len(rank)))  # stable: the others keep their order

    def get_command(self, ctx, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        if command is not None and cmd_name in COMMAND_SECTIONS:
            show_config_defaults(command, STAGE_CONFIGS[COMMAND_SECTIONS[cmd_name]])
        return command


def show_config_defaults(command: Any, cls: type) -> None:
    """--help shows each option's effective default: options default to None (so that the config file and the
    environment can set them), the real default lives in the stage's settings class."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for param in command.params:
        key = CONFIG_KEYS.get(param.name, param.name)
        if param.default is None and defaults.get(key) not in (None, dataclasses.MISSING):
            default = defaults[key]
            param.show_default = str(default).lower() if isinstance(default, bool) else str(default)


app = typer.Typer(
    name="mlgen",
    cls=MlgenGroup,
    help="Synthetic training data and a multi-label classifier for labels nobody has annotated. "
    "Every stage option is also a config-file key and an MLGEN_<SECTION>_<KEY> variable; flags win.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"show_default": True},
)
app.add_typer(world_app, rich_help_panel=RESEARCH)  # mlgen world ...: the toy world

RunOpt = Annotated[
    Path,
    typer.Option(
        "--run",
        "--run-dir",
        envvar="MLGEN_RUN",
        help="Run directory (--run-dir under torchrun, whose own --run-path makes --run ambiguous).",
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", envvar="MLGEN_CONFIG", help="YAML config file (sections per stage).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Redo this stage from scratch if its settings changed.")
]
AliasesOpt = Annotated[
    Path | None,
    typer.Option("--label-aliases", help="More names per label: 'label: alias, alias' lines or a YAML mapping."),
]
ClassesOpt = Annotated[Path | None, typer.Option("--classes", help="Labels file: one label per line, # comments.")]
LlmOpt = Annotated[
    str | None,
    typer.Option(
        "--llm",
        help="smollm2 (built in, small: use a larger instruct model for real runs), template, a transformers "
        "id/folder, vllm:ID, openai:MODEL.",
    ),
]
PromptsPerSetOpt = Annotated[int | None, typer.Option("--prompts-per-set", help="Scene prompts per label set.")]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", help="diffusers model id or folder; built in (named only): toy* (toy world), tiny (random weights)."
    ),
]
ClipOpt = Annotated[
    str | None,
    typer.Option(
        "--clip", help="open_clip ARCH/PRETRAINED, hf-hub:ID, folder; built in (named only): toy*, tiny (random)."
    ),
]
ImagesOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--images",
        help="A folder where a COCO JSON's file_names are (looked up first; repeat for more than one).",
    ),
]
StepsAliasOpt = Annotated[int | None, typer.Option("--steps", hidden=True, help="Deprecated name.")]
DEFAULT_RUN = Path("mlgen-run")


@functools.cache
def _config_sections(config_file: Path | None) -> dict[str, Any]:
    return read_config_file(config_file)


def _settings(config_file: Path | None, section: str, cls: type, **flags: Any) -> Any:
    """Defaults < config file section < MLGEN_<SECTION>_<KEY> environment < flags."""
    return stage_settings(cls, section, _config_sections(config_file).get(section), flags)


def _labels(classes_file: Path | None) -> list[str] | None:
    return read_labels(classes_file) if classes_file else None


def _existing_run(run: Path) -> RunDir:
    """The run directory of a command that reads a run (evaluate, predict, report): it must exist."""
    if not run.is_dir():
        raise MlgenError(f"no run directory at {run}" + (" (it is a file)" if run.exists() else ""))
    return RunDir(run)


def _say(marker: dict[str, Any], run: Path) -> None:
    if marker:
        counts = ", ".join(f"{k} {v}" for k, v in marker["counts"].items())
        typer.echo(f"{marker['stage']}: done ({counts}) in {run / marker['stage']}")


@app.command(rich_help_panel=PIPELINE)
def generate(
    run: RunOpt = DEFAULT_RUN,
    classes: ClassesOpt = None,
    model: ModelOpt = None,
    images_per_prompt: Annotated[int | None, typer.Option(help="Images per prompt.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Samples per shard.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per diffusion batch.")] = None,
    denoising_steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the preset's).")] = None,
    steps: StepsAliasOpt = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels (default: the model's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed (per-image seeds derive from it).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="euler (paper), euler-a, ddim, dpm++, pndm, lms, heun, unipc, model."),
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Sampling preset (default: by model id; mlgen models).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32.")] = None,
    compile_unet: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the UNet.")] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(help="Fine-tuned text encoder folder (default: RUN/text_encoder)."),
    ] = None,
    llm: LlmOpt = None,
    prompts_per_set: PromptsPerSetOpt = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Render images-per-prompt x prompts images into WebDataset shards (runs `prompts` first if needed).

    Paper's label pairs: each image draws its set as the official loop (two picks, one redraw: ~1/n² single-label).

    Sets you chose (--label-sets, --set-size): every prompt is rendered images-per-prompt times.
    """
    settings = _settings(
        config,
        "generate",
        GenerateConfig,
        model=model,
        images_per_prompt=images_per_prompt,
        shard_size=shard_size,
        batch_size=batch_size,
        steps=renamed_flag(denoising_steps, steps, "--steps", "--denoising-steps"),
        size=size,
        seed=seed,
        guidance=guidance,
        scheduler=scheduler,
        preset=preset,
        dtype=dtype,
        compile=compile_unet,
        text_encoder=text_encoder,
    )
    # Only prompt options given explicitly (config file, environment, flag) may change existing prompts.
    explicit = {
        **(_config_sections(config).get("prompts") or {}),
        **env_settings("prompts"),
        "llm": llm,
        "prompts_per_set": prompts_per_set,
    }
    prompt_settings = workflow.prompt_settings_for_generate(RunDir(run), explicit)
    _say(workflow.generate(RunDir(run), settings, prompt_settings, _labels(classes), overwrite), run)


@app.command("filter", rich_help_panel=PIPELINE)
def filter_(
    run: RunOpt = DEFAULT_RUN,
    clip: ClipOpt = None,
    threshold: Annotated[float | None, typer.Option(help="Probability a detected label needs.")] = None,
    rescore: Annotated[
        bool,
        typer.Option(
            "--rescore", help="Redo every decision (new threshold or rule) from the cached image embeddings: no CLIP."
        ),
    ] = False,
    text: Annotated[
        str | None,
        typer.Option(
            help="Text side: bare (class names, paper), ensemble (prompt templates), s3 (synonym spaces), "
            "best (each label's most reliable name among label, synonyms and aliases)."
        ),
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(help="exact (COCO: detected labels = requested) or topk (NUS-WIDE: requested in the top-k)."),
    ] = None,
    topk: Annotated[
        int | None, typer.Option(help="topk rule: k (default: 7-of-81 share of the labels, >= requested + 1).")
    ] = None,
    extra_threshold: Annotated[
        float | None, typer.Option(help="topk rule: another top-k label above this probability becomes a label.")
    ] = None,
    gate: Annotated[
        float | None,
        typer.Option(help="Do not filter on a label whose teacher AUROC (reliability.json) is below this; 0: off."),
    ] = None,
    min_keep: Annotated[
        float | None,
        typer.Option(help="Each label keeps at least this share of its images, its most confident first; 0: off."),
    ] = None,
    competitors: Annotated[
        Path | None, typer.Option(help="Labels file scored as competitors, never kept as labels (e.g. seen labels).")
    ] = None,
    background: Annotated[
        str | None, typer.Option(hidden=True, help='A neutral prompt scored as one more competitor (e.g. "a photo").')
    ] = None,
    label_aliases: AliasesOpt = None,
    dedup: Annotated[
        float | None,
        typer.Option(help="Drop near-duplicates: image cosine above this to a kept image of the same label set."),
    ] = None,
    prototype: Annotated[
        float | None,
        typer.Option(
            hidden=True,
            help="Blend each label's text with this weight of its image prototype (the mean embedding of the "
            "images asked for it, leave-one-out); the gate still reads the text alone. 0: off.",
        ),
    ] = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Keep an image only when CLIP detects the labels that were asked for."""
    settings = _settings(
        config,
        "filter",
        FilterConfig,
        clip=clip,
        threshold=threshold,
        dedup=dedup,
        text=text,
        rule=rule,
        topk=topk,
        extra_threshold=extra_threshold,
        gate=gate,
        min_keep=min_keep,
        competitors=str(competitors) if competitors else None,
        background=background,
        label_aliases=str(label_aliases) if label_aliases else None,
        prototype=prototype,
    )
    _say(workflow.filter_images(RunDir(run), settings, overwrite, rescore), run)


@app.command(rich_help_panel=INSPECT)
def report(run: RunOpt = DEFAULT_RUN) -> None:
    """Write RUN/report/index.html (per label: contact sheets of kept and dropped images, scores, counts, the
    teacher's reliability) and print the reliability table."""
    run_dir = _existing_run(run)
    run_dir.require("filtered")  # before the report's imports load torch and CLIP
    from rich.console import Console

    from mlgen.report import build_report, read_reliability, reliability_summary

    page = build_report(run_dir)
    Console(highlight=False, soft_wrap=True).print(*reliability_summary(read_reliability(run_dir.root)), sep="\n")
    typer.echo(f"report: {page}")


@app.command("train-classifier", rich_help_panel=PIPELINE)
def train_classifier(
    run: RunOpt = DEFAULT_RUN,
    clip: ClipOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    source: Annotated[
        str | None,
        typer.Option(hidden=True, help="filtered (kept images) or raw (all generated: no-filter ablation)."),
    ] = None,
    head_init: Annotated[
        str | None,
        typer.Option(hidden=True, help="text (CLIP zero-shot weights) or random (learn from images)."),
    ] = None,
    head: Annotated[str | None, typer.Option(help="linear, dualcoop or cprfl.")] = None,
    fusion: Annotated[
        bool | None, typer.Option("--fusion/--no-fusion", help="Train feature fusion inside the frozen encoder.")
    ] = None,
    loss: Annotated[str | None, typer.Option(help="asl, mlcd or bce.")] = None,
    soft_targets: Annotated[
        float | None,
        typer.Option(
            hidden=True,
            help="W in [0, 1]: a generated image's other labels train on W x the filter's teacher probability "
            "instead of 0 (its labels stay 1); 0: off (the default).",
        ),
    ] = None,
    seen_data: Annotated[
        str | None,
        typer.Option(
            help="Real images of seen labels to train on too: a labels CSV, COCO JSON, WebDataset tars, "
            "or a benchmark split (coco-zsl:ROOT:seen-train, nus-zsl:ROOT:seen-train)."
        ),
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(
            hidden=True,
            help="With --seen-data: official (a real then a synthetic pass per epoch), mixed or alternating.",
        ),
    ] = None,
    train_steps: Annotated[
        int | None, typer.Option(min=1, help="Exactly this many optimizer steps instead of --epochs.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, hidden=True, help="Deprecated name.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd (official, the default) or adamw.")] = None,
    holdout: Annotated[
        float | None, typer.Option(help="Fraction of label sets held out for a SYNTHETIC score (default 0: off).")
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option("--augment/--no-augment", help="Official training augmentation (Cutout + RandAugment)"),
    ] = None,
    label_masks: Annotated[
        bool | None,
        typer.Option("--label-masks/--no-label-masks", help="Real batches on seen columns, synthetic on unseen."),
    ] = None,
    seen_classes_per_batch: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="With --seen-data: each real batch scored on N seen labels drawn at random (official 100; 0: all).",
        ),
    ] = None,
    class_specific_context: Annotated[
        bool | None,
        typer.Option(
            "--class-specific-context/--shared-context",
            hidden=True,
            help="dualcoop: one learned context pair per class (default: one shared pair, as the official code).",
        ),
    ] = None,
    dualcoop_scoring: Annotated[
        str | None, typer.Option(hidden=True, help="dualcoop: dense (official region aggregation) or pooled.")
    ] = None,
    prompt_context: Annotated[
        int | None,
        typer.Option(help="dualcoop: learned context tokens (official 64; 4 for the toy CLIPs' short text window)."),
    ] = None,
    cprfl_recipe: Annotated[
        str | None,
        typer.Option(hidden=True, help="cprfl: official (raw text, AdamW, OneCycle, EMA) or mlgen (normalised, SGD)."),
    ] = None,
    val_data: Annotated[
        str | None,
        typer.Option(help="Labelled validation images: keep the best epoch's weights by their mAP (never test data)."),
    ] = None,
    select_every: Annotated[
        int | None, typer.Option(min=1, hidden=True, help="With --val-data: validate every N epochs.")
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            help="validation (--val-data or --val-holdout; else the final weights), official (best TEST F1@3 of "
            "--test-data, a ZSL and a GZSL checkpoint, as the official code) or both, side by side."
        ),
    ] = None,
    val_holdout: Annotated[
        float | None, typer.Option(help="Share of --seen-data held out of training and validated on (0: none).")
    ] = None,
    test_data: Annotated[
        str | None, typer.Option(help="--select official/both: the benchmark, coco-zsl:ROOT or nus-zsl:ROOT.")
    ] = None,
    images: ImagesOpt = None,
    pass_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            hidden=True,
            help="Exactly N batches in every pass of an epoch (equal steps whatever the image count).",
        ),
    ] = None,
    config: ConfigOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train the classifier (backbone, fusion, head, loss) on the kept images (and --seen-data); score it with
    `mlgen evaluate --data` (--holdout adds a synthetic held-out score)."""
    settings = _settings(
        config,
        "classifier",
        ClassifierConfig,
        clip=clip,
        epochs=epochs,
        source=source,
        head_init=head_init,
        head=head,
        fusion=fusion,
        loss=loss,
        soft_targets=soft_targets,
        seen_data=seen_data,
        schedule=schedule,
        steps=renamed_flag(train_steps, steps, "--steps", "--train-steps"),
        optimizer=optimizer,
        holdout=holdout,
        augment=augment,
        label_masks=label_masks,
        seen_classes_per_batch=seen_classes_per_batch,
        class_specific_context=class_specific_context,
        dualcoop_scoring=dualcoop_scoring,
        prompt_context=prompt_context,
        cprfl_recipe=cprfl_recipe,
        val_data=val_data,
        select_every=select_every,
        pass_steps=pass_steps,
        select=select,
        val_holdout=val_holdout,
        test_data=test_data,
        images=tuple(str(folder) for folder in images) if images else None,
    )
    _say(workflow.train_classifier(RunDir(run), settings, overwrite), run)
    _print_metrics(run)


@app.command(rich_help_panel=PIPELINE)
def evaluate(
    run: RunOpt = DEFAULT_RUN,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Real labelled images: a labels CSV, a COCO-style JSON, WebDataset tars, or a benchmark "
            "(coco-zsl:ROOT, nus-zsl:ROOT: the papers' ZSL and GZSL test splits; :SPLIT for one split).",
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="The unseen labels scored in the ZSL setting (default: those the classifier saw no real image of).",
        ),
    ] = None,
    zero_shot: Annotated[
        str | None,
        typer.Option(
            "--zero-shot", help="A training-free baseline instead: clip (prompt ensemble) or s3 (synonym spaces)."
        ),
    ] = None,
    clip: Annotated[str, typer.Option(help="The CLIP model of --zero-shot.")] = PAPER_FILTER_CLIP,
    ap_rule: Annotated[
        str | None,
        typer.Option(
            help="A label without a positive image: official (AP 0, in the mean; the default on coco-zsl:/nus-zsl:) "
            "or sklearn (left out of mAP; the default elsewhere)."
        ),
    ] = None,
    label_aliases: Annotated[
        Path | None,
        typer.Option(
            "--label-aliases",
            help="With --zero-shot: your names of labels ('label: alias, alias' lines or YAML); clip averages a "
            "label's names, s3 adds them to its point set.",
        ),
    ] = None,
    skip_missing: Annotated[
        bool,
        typer.Option(help="A benchmark --data: go on without the images that are not there (counted, three named)."),
    ] = False,
    images: ImagesOpt = None,
) -> None:
    """Score the classifier on real labelled images (ZSL, GZSL, beside CLIP zero-shot); no --data: print metrics."""
    if ap_rule not in (None, "official", "sklearn"):
        raise MlgenError(f"--ap-rule must be official or sklearn, not {ap_rule!r}")
    run_dir = _existing_run(run)
    image_folders = tuple(images or ())
    if image_folders:
        from mlgen.classifiers.data import check_image_folders

        check_image_folders(image_folders, [data])
    if skip_missing and data is not None:
        from mlgen.classifiers.benchmarks import with_skip_missing  # numpy only

        data = Path(with_skip_missing(data))
    if label_aliases is not None and zero_shot is None:
        raise MlgenError("--label-aliases is read by --zero-shot clip|s3 only (the classifier learned its labels)")
    if zero_shot is not None:
        if data is None:
            raise MlgenError("--zero-shot needs --data (the real labelled images to score)")
        from mlgen.classifiers.inputs import check_zero_shot_inputs, zero_shot_aliases

        check_zero_shot_inputs(run_dir, data, zero_shot)  # before torch loads
        aliases = zero_shot_aliases(run_dir, data, label_aliases) if label_aliases else None
        metrics = workflow.evaluate_zero_shot(run_dir, data, zero_shot, clip, _labels(labels), aliases, image_folders)
        for name in ("zsl", "gzsl"):
            title = f"{zero_shot} zero-shot, real images, {name.upper()}"
            shown = "  ".join(f"{k} {metrics[name][k]:.3f}" for k in ("mAP", "f1@3", "f1@5") if k in metrics[name])
            typer.echo(f"{title:<40} {shown}  ({metrics[name]['images']} images)")
        typer.echo(f"metrics: {run_dir.root / 'zero-shot' / zero_shot / 'metrics.json'}")
        return
    run_dir.require("classifier")
    if data is not None:
        workflow.evaluate(run_dir, data, _labels(labels), ap_rule, image_folders)
    _print_metrics(run)


SHOWN = ("mAP", "precision@3", "recall@3", "f1@3", "precision@5", "recall@5", "f1@5")
METRIC_TITLES = {
    "zsl": "real images, ZSL (unseen labels)",
    "gzsl": "real images, GZSL (all labels)",
    "synthetic_heldout": "SYNTHETIC held-out images (not real)",
    "zero_shot_clip_heldout": "CLIP zero-shot, synthetic held-out",
}


def _print_metrics(run: Path) -> None:
    metrics = json.loads((run / "classifier" / "metrics.json").read_text())
    rows = {name: metrics[name] for name in METRIC_TITLES if name in metrics}
    if "zero_shot_clip" in metrics:
        rows = {"zsl": rows.pop("zsl"), "zero_shot_clip": metrics["zero_shot_clip"]["zsl"], **rows}
    titles = {**METRIC_TITLES, "zero_shot_clip": "CLIP zero-shot, real images, ZSL"}
    if metrics.get("selected"):  # --select official: these weights were chosen on the test split
        titles = {**titles, **{n: f"{titles[n]}, {metrics['selected']}" for n in ("zsl", "gzsl")}}
    elif metrics.get("official"):
        titles = {**titles, **{n: f"{titles[n]}, selected on validation" for n in ("zsl", "gzsl")}}
    for name, values in rows.items():
        shown = "  ".join(f"{k} {values[k]:.3f}" for k in SHOWN if k in values)
        typer.echo(f"{titles[name]:<40} {shown}  ({values['images']} images)")
    from mlgen.recipe import selection_lines

    for line in selection_lines(metrics):  # the test-selected checkpoints beside, and the optimism
        typer.echo(line)
    if metrics.get("missing_images_skipped"):
        named = ", ".join(metrics.get("missing_images_first", []))
        typer.echo(f"skipped {metrics['missing_images_skipped']} images that are not there ({named})")
    if metrics.get("corrupt_images_skipped"):
        typer.echo(f"skipped {metrics['corrupt_images_skipped']} unreadable images")
    if metrics.get("unknown_labels"):
        typer.echo(f"labels the classifier does not know (ignored): {', '.join(sorted(metrics['unknown_labels']))}")


@app.command(rich_help_panel=PIPELINE)
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    run: RunOpt = DEFAULT_RUN,
    output_format: Annotated[
        str, typer.Option("--format", help="jsonl (one {image, scores} line per image) or csv.")
    ] = "jsonl",
) -> None:
    """Score image files with the trained classifier: every label's probability, as JSON lines or CSV."""
    if output_format not in ("jsonl", "csv"):
        raise MlgenError(f"--format must be jsonl or csv, not {output_format!r}")
    run_dir = _existing_run(run)
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise MlgenError(f"image not found: {missing[0]}")
    run_dir.require("classifier")
    from mlgen.classifiers.predict import format_predictions, predict_files  # torch: once the input is checked

    typer.echo(format_predictions(images, predict_files(run_dir, images), output_format), nl=False)


@app.command("run", rich_help_panel=SCALE)
def run_all(
    config: Annotated[
        Path,
        typer.Option("--config", envvar="MLGEN_CONFIG", help="YAML config: run, classes and one section per stage."),
    ],
    run: Annotated[
        Path | None,
        typer.Option("--run", "--run-dir", envvar="MLGEN_RUN", help="Run directory (default: the config's `run`)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    quota: Annotated[
        int | None,
        typer.Option(min=1, help="Generate and filter in rounds until every label has this many kept images."),
    ] = None,
    max_rounds: Annotated[
        int | None, typer.Option(min=1, help="Most quota rounds before the run stops (default: rounds: or 5).")
    ] = None,
    benchmark: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Reproduce a benchmark: coco-zsl:ROOT or nus-zsl:ROOT (its unseen labels generated, seen-train "
            "trained on, ZSL and GZSL test splits scored; examples/paper-*.yaml, docs/reproduce.md).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would run, its time and disk; load and write nothing.")
    ] = False,
    bench: Annotated[
        Path | None, typer.Option(help="--dry-run: bench.json of `mlgen bench` (default: RUN/ or ./bench.json).")
    ] = None,
) -> None:
    """Run every stage from one config file."""
    data = read_config_file(config)
    run_dir = RunDir(run or Path(data.get("run", DEFAULT_RUN)))
    classes = _labels(Path(data["classes"])) if data.get("classes") else None
    from mlgen.recipe import benchmark_setup, benchmark_spec, rounds_settings

    quota, max_rounds = rounds_settings(data, quota, max_rounds)
    spec = benchmark_spec(benchmark) if benchmark is not None else None
    implied: dict[str, Any] = {}  # what the benchmark sets: its unseen labels, seen-train, its test splits
    if spec is not None:
        classes, implied = benchmark_setup(spec, data, classes)
    if dry_run:
        from mlgen.dryrun import dry_run_lines

        typer.echo("\n".join(dry_run_lines(data, run_dir, classes, quota, bench, spec, implied)))
        return
    section = {
        name: stage_settings(cls, name, data.get(name), {})
        for name, cls in [
            ("prompts", PromptsConfig),
            ("generate", GenerateConfig),
            ("filter", FilterConfig),
        ]
    }
    section["classifier"] = build_config(ClassifierConfig, implied, data.get("classifier"), env_settings("classifier"))
    tuned = stage_settings(FinetuneConfig, "finetune", data["finetune"], {}) if "finetune" in data else None
    workflow.check_models(
        [section["generate"].model, *([tuned.model] if tuned else [])],
        [section["filter"].clip, section["classifier"].clip, *([tuned.clip] if tuned else [])],
    )
    if tuned is not None:  # the optional stage runs when the config has a finetune: section
        from mlgen.finetune.stage import finetune

        if classes is not None or run_dir.success("prompts") is None:
            workflow.make_prompts(run_dir, section["prompts"], classes)
        finetune(run_dir, tuned, overwrite)
    if quota is not None:  # the paper's loop: rounds of generate + filter until every label has `quota` kept
        from mlgen.generate.rounds import run_rounds

        if classes is not None or run_dir.success("prompts") is None:
            workflow.make_prompts(run_dir, section["prompts"], classes)
        run_rounds(run_dir, section["generate"], section["filter"], quota, max_rounds)
    else:
        workflow.generate(run_dir, section["generate"], section["prompts"], classes, overwrite)
        workflow.filter_images(run_dir, section["filter"], overwrite)
    workflow.train_classifier(run_dir, section["classifier"], overwrite)
    if spec is not None:  # the papers' tables: ZSL and GZSL on the test splits (both selections when made)
        workflow.evaluate(run_dir, Path(str(spec)))
    _print_metrics(run_dir.root)


@app.command(rich_help_panel=INSPECT)
def status(run: RunOpt = DEFAULT_RUN) -> None:
    """Per-stage progress: shards done / planned, read from the stats files."""
    if not run.is_dir():
        raise MlgenError(f"no run directory at {run}")
    for row in workflow.stage_progress(RunDir(run)):
        state = "finished" if row["finished"] else ("not started" if row["total"] == 0 else "in progress")
        if row.get("stale"):
            redone = ", ".join(row["stale"])
            state = f"STALE (input '{redone}' redone since; rerun with --overwrite)"
        counts = ", ".join(f"{k} {v}" for k, v in row["counts"].items())
        typer.echo(f"{row['stage']:<11} {row['done']:>5}/{row['total']:<5} shards  {state}  {counts}".rstrip())
    from mlgen.generate.rounds import quota_status

    for line in quota_status(RunDir(run)):
        typer.echo(line)


@app.command(rich_help_panel=RESEARCH)
def demo(
    run: RunOpt = Path("mlgen-demo"),
    llm: Annotated[str, typer.Option("--llm", help="smollm2 (built-in LLM) or template (no LLM).")] = "smollm2",
    model: Annotated[
        str,
        typer.Option("--model", help="toy (the trained toy world) or tiny (random weights: a smoke test)."),
    ] = "toy",
) -> None:
    """The whole pipeline offline on the toy world, scored on rendered real scenes (--model tiny: a smoke run)."""
    from mlgen.demo import run_demo

    started = time.time()
    summary = run_demo(RunDir(run), llm, model)
    typer.echo(f"\nmlgen demo finished in {time.time() - started:.0f} s. Outputs in {run}/:")
    for line in summary:
        typer.echo(f"  {line}")


app.command("prompts", rich_help_panel=PIPELINE)(prompts_command)
app.command("finetune", rich_help_panel=PIPELINE)(finetune_command)
app.command("experiment", rich_help_panel=RESEARCH)(experiment_command)
app.command("bench", rich_help_panel=SCALE)(bench_command)
app.command("models", rich_help_panel=INSPECT)(models_command)
app.command("export", rich_help_panel=INSPECT)(export_command)


@app.callback(invoke_without_command=True)
def _version(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False) -> None:
    if version:
        typer.echo(f"mlgen {__version__}")
        raise typer.Exit()


def usage_error_line(err: click_exceptions.ClickException) -> str:
    """A command-line usage error (missing argument, a value click cannot parse or that is out of
    range) as one line, like every other error, instead of typer's boxed usage block."""
    message = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"mlgen: error: {message}{where}"


def main() -> None:
    warn_unknown_env()
    try:
        code = app(standalone_mode=False)  # typer's Exit (--help, --version, Ctrl-C) comes back as a code
    except MlgenError as err:
        typer.echo(f"mlgen: error: {err}", err=True)
        sys.exit(1)
    except NO_ARGS_IS_HELP as err:  # typer printed the help already
        sys.exit(err.exit_code)
    except click_exceptions.ClickException as err:
        typer.echo(usage_error_line(err), err=True)
        sys.exit(err.exit_code)
    except typer.Abort:  # end of input at a prompt (typer.Abort is click's Abort in older typer)
        typer.echo("mlgen: aborted", err=True)
        sys.exit(1)
    if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into exit status 130
        typer.echo("mlgen: interrupted: finished shards are kept; run the same command again to resume", err=True)
    sys.exit(code if isinstance(code, int) else 0)
