"""Stage settings: frozen dataclasses, merged from defaults < config file < environment < flags.

A field whose metadata says ``shapes_output=False`` (batch sizes, devices) may change between
runs; every other field is recorded in the stage plan, and a resumed run with a different value
is refused (see :mod:`mlgen.pipeline.runner`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mlgen.errors import MlgenError

# The paper's models: what a stage uses when no model is named (built-in models are used only when named).
PAPER_DIFFUSION = "stabilityai/stable-diffusion-2"
PAPER_FILTER_CLIP = "ViT-B-32/openai"
PAPER_CLASSIFIER_CLIP = "RN50/openai"

# The paper's negative prompt, verbatim (Diff-ZS-MLC, methods.md section A).
PAPER_NEGATIVE_PROMPT = (
    "watermark, text, poorly-drawn-eyes, poorly-drawn-fingers, bad-anatomy, ugly, extra fingers, "
    "extra limbs, missing fingers, missing limbs, deformed, mutated hands and fingers"
)


def runtime(default: Any) -> Any:
    """A setting that does not change what a stage writes (so it may differ on resume)."""
    return field(default=default, metadata={"shapes_output": False})


def added(default: Any) -> Any:
    """A setting added after runs were made: left out of the plan while it has its default, so a run made before
    it existed keeps its settings (and hash)."""
    return field(default=default, metadata={"omit_when_default": True})


@dataclass(frozen=True)
class PromptsConfig:
    llm: str = "smollm2"  # smollm2 (embedded), template (no LLM), a transformers id/folder, vllm:ID, openai:MODEL
    prompts_per_set: int = 10  # the paper's 10 phrases per label set
    synonyms_per_label: int = 5
    synonym_source: str = "both"  # lexicon (WordNet, offline), llm, or both: the lexicon first, the LLM fills up
    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 60  # per sentence (a `list` instruction asks for prompts_per_set of them at once)
    seed: int = 0
    negative_prompt: str = PAPER_NEGATIVE_PROMPT
    exclude_pairs: tuple[tuple[str, str], ...] = ()  # pairs the generator and CLIP confuse
    set_size: int | None = None  # None: every unordered pair (paper); K: balanced sets of 1..K labels
    sets_per_label: int = 10  # with set_size: sets each label appears in (about)
    label_sets: tuple[tuple[str, ...], ...] | None = None  # explicit label sets (--label-sets FILE)
    prompt_style: str = "mlgen"  # mlgen (few-shot, default), paper (Diff-ZS-MLC's dialog), plain
    prompt_template: str | None = None  # a YAML instruction file instead of the style's
    min_words: int = 8
    max_words: int = 60  # CLIP's text encoder reads 77 tokens
    dedup_threshold: float = 0.9  # a prompt this close (MiniLM cosine) to one its set has is a near duplicate
    synonym_threshold: float = 0.6  # a synonym's MiniLM cosine to its label is at least this (README: prompts)
    label_aliases: dict[str, list[str]] | None = added(None)  # user aliases (--label-aliases FILE): prompts may name
    max_attempts: int = 3  # requests per set (new seeds each) before the template fills the rest
    sets_per_shard: int = 32
    batch_size: int = runtime(16)
    llm_base_url: str | None = runtime(None)  # openai: server URL (else OPENAI_BASE_URL)
    concurrency: int = runtime(8)  # openai: requests in flight
    request_timeout: float = runtime(120.0)  # openai: seconds per request
    request_retries: int = runtime(3)  # openai: retries with exponential backoff


@dataclass(frozen=True)
class GenerateConfig:
    model: str = PAPER_DIFFUSION  # diffusers text-to-image id or folder; tiny (random weights) / toy* when named
    preset: str | None = None  # None: chosen by model id (mlgen models); fills steps/guidance/size/scheduler left unset
    images_per_prompt: int = 1
    shard_size: int = 100
    steps: int | None = None  # None: the preset's
    size: int | None = None  # image side in pixels; None: the preset's, else the model's native size
    guidance: float | None = None  # None: the preset's
    scheduler: str | None = None  # euler, euler-a, ddim, dpm++, pndm, lms, heun, unipc, or model; None: the preset's
    seed: int = 0
    image_format: str = "jpg"  # jpg, png or webp
    jpeg_quality: int = 95
    batch_size: int | None = runtime(None)  # None: 8 on CPU; on CUDA, what fits in free memory
    dtype: str = runtime("auto")  # auto: fp16 on CUDA, fp32 on CPU
    compile: bool = runtime(False)  # torch.compile the UNet (CUDA; pays off over thousands of images)
    text_encoder: str | None = runtime(None)  # fine-tuned text encoder folder; None: RUN/text_encoder if present


@dataclass(frozen=True)
class FilterConfig:
    clip: str = PAPER_FILTER_CLIP  # open_clip ARCH/PRETRAINED, hf-hub:ID, folder, or a built-in (tiny, toy*)
    threshold: float = 0.5
    text: str = "bare"  # bare (paper: class names) | ensemble (prompt templates averaged) | s3 (synonym spaces)
    # | best (each label's most reliable name: label, synonyms or aliases)
    rule: str = "exact"  # exact (COCO: the detected set is the requested set) | topk (NUS-WIDE: see --topk)
    topk: int | None = None  # topk rule: requested labels within the top-k; None: 7-of-81 share, >= requested + 1
    extra_threshold: float = 0.1  # topk rule: another top-k label above this probability is added as a label
    # Both chosen on the experiment's validation scenes in both toy worlds (README: The filter's default):
    gate: float = 0.75  # a label whose teacher AUROC is below this is not filtered on (0: judge every label)
    min_keep: float = 0.5  # each label keeps at least this share of its images, its most confident first (0: off)
    competitors: str | None = None  # a labels file scored beside the classes, never kept as labels (seen labels)
    background: str | None = None  # a neutral prompt scored as one more competitor (e.g. "a photo")
    label_aliases: str | None = added(None)  # `label: alias, alias` file: more names for the text side
    dedup: float = 0.0  # >0: drop a kept image with cosine > dedup to an earlier kept one of its label set
    # >0: each label's text column blended with W x its image prototype (the mean embedding of the images asked
    # for it, leave-one-out); the gate still reads the text alone (README: The filter)
    prototype: float = added(0.0)
    parents: str | None = added(None)  # nus-wide (the official class relationship, shipped) or a 'parent: child' file
    batch_size: int = runtime(64)
    workers: int = runtime(2)  # DataLoader processes decoding images while CLIP runs (0: inline)


@dataclass(frozen=True)
class ClassifierConfig:
    clip: str = PAPER_CLASSIFIER_CLIP  # the frozen backbone (the paper's DualCoOp runs on RN50)
    epochs: int = 50  # the official 50
    steps: int | None = None  # exactly this many optimizer steps instead of epochs (cycling the passes)
    lr: float | None = None  # None: the optimizer's own (SGD 0.002 as official, AdamW 1e-3)
    optimizer: str | None = None  # sgd (official, lr 0.002) or adamw (lr 1e-3); None: sgd
    batch_size: int = 32  # the official 32
    holdout: float = 0.0  # >0: fraction of the label sets held out for a SYNTHETIC score (official: none)
    seed: int = 0
    source: str = "filtered"  # filtered (kept images) or raw (every generated image: the no-filter ablation)
    head_init: str = "text"  # text: start from CLIP's zero-shot weights; random: learn from the images alone
    head: str = "linear"  # linear, dualcoop (learned prompt contexts) or cprfl (category-prompt refinement)
    fusion: bool = False  # train the paper's feature fusion modules inside the frozen image encoder
    loss: str = "asl"  # asl, mlcd or bce
    soft_targets: float = 0.0  # W > 0: a generated image's labels other than its training labels are trained on
    # W x the teacher's filter probability instead of 0 (He et al. 2023); needs the filter's scores (filtered)
    seen_data: str | None = None  # real images of seen labels (CSV, COCO JSON or WebDataset) beside the synthetic
    schedule: str = "official"  # with seen_data: official (a real pass then a synthetic pass), mixed, alternating
    label_masks: bool = True  # real batches scored on the seen columns only, synthetic on the unseen (official)
    seen_classes_per_batch: int = 100  # each real batch scored on this many seen labels drawn at random (official
    # 100, when there are more: NUS-WIDE's 925); 0: every seen label
    augment: bool = True  # official training augmentation: squash resize + Cutout + RandAugment
    augment_views: int = 8  # augment with a cached frozen encoder: K augmented views cached, epoch e reads e mod K
    class_specific_context: bool = False  # dualcoop: one context pair per class instead of the shared one
    dualcoop_scoring: str = "dense"  # dualcoop: dense (official region aggregation) or pooled
    prompt_context: int = 64  # dualcoop: learned context tokens (official 64; capped by the text window)
    cprfl_recipe: str = "official"  # cprfl: official (raw text, AdamW 1e-5, OneCycle, EMA) or mlgen
    pass_steps: int | None = None  # every pass of an epoch takes exactly this many batches (its source cycled)
    passes_per_epoch: int | None = None  # pad the epoch with empty passes: the cosine steps this often per epoch
    val_data: str | None = None  # labelled validation images: keep the best epoch's weights (never the test set)
    select_every: int = 1  # with val_data: evaluate every N epochs (and after the last)
    # validation (val_data or val_holdout; else the final weights), official (the epoch of the best TEST F1@3 of
    # test_data, a ZSL and a GZSL checkpoint, as the official code; labelled so everywhere), or both side by side
    select: str = added("validation")
    val_holdout: float = added(0.0)  # >0: this share of seen_data's images held out of training, validated on
    test_data: str | None = added(None)  # select official/both: the benchmark (coco-zsl:ROOT, nus-zsl:ROOT)
    val_labels: tuple[str, ...] | None = added(None)  # with val_data: select on these labels' mAP (None: the run's);
    # a label the head never trained on is scored by name (a shared-context DualCoOp: mlgen experiment's seen-only)
    images: tuple[str, ...] = added(())  # folders where a COCO JSON seen_data/val_data's file_names are looked first
    cache: bool = runtime(True)  # frozen features cached on disk (float16) when only a head trains


@dataclass(frozen=True)
class FinetuneConfig:
    """Text-encoder fine-tuning (Diff-ZS-MLC); names follow the diffusers training scripts."""

    model: str = PAPER_DIFFUSION  # the diffusion model whose text encoder learns
    clip: str = PAPER_FILTER_CLIP  # the CLIP discriminator (as the filter's --clip)
    learning_rate: float = 7e-8  # AdamW, as the paper
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-3
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # constant, linear or cosine (no warmup)
    train_batch_size: int = 1  # images per optimizer step, over all ranks
    max_train_steps: int = 1000
    steps: int = 30  # denoising steps per training image
    size: int = 560  # image side in pixels
    guidance: float = 7.5
    grad_steps: int | None = None  # backpropagate through the last K denoising steps only; None = all
    label_aliases: dict[str, list[str]] | None = added(None)  # user aliases: the CLIP loss's text side reads them too
    best_names: dict[str, str] | None = added(None)  # --names-from: a label's best name in place of its own
    lora_rank: int | None = None  # None: the whole text encoder learns; else LoRA adapters of this rank
    lora_alpha: float | None = None  # None: the rank
    seed: int = 0
    gradient_checkpointing: bool = runtime(True)  # on the UNet and VAE decoder: less memory, same result
    mixed_precision: str = runtime("auto")  # auto (bf16/fp16 on CUDA, none on CPU), no, fp16, bf16
    save_every: int = runtime(100)  # checkpoint every N steps (--checkpointing-steps)
    checkpoints_total_limit: int = runtime(2)  # older checkpoints are deleted
    log_every: int = runtime(10)  # a log.csv row every N steps


@dataclass(frozen=True)
class ExperimentConfig:
    """``mlgen experiment``: arms compared on one real test set, paired by seed (mlgen.experiment)."""

    world: str | None = "toy"  # toy (headroom world), toy-classic, or None: your own --data/--seen-data
    unseen: str | None = None  # comma-separated unseen labels (the generated ones)
    seen: str | None = None  # comma-separated seen labels; None: the world's other shapes / --seen-data's labels
    seeds: int = 10
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (scenes, generation, training, test draws)
    splits: int = 1  # unseen-label splits: the given --unseen, then others drawn from the world (toy worlds)
    arms: str = "ALL"  # ALL or a comma-separated subset (mlgen experiment --help lists them)
    data: str | None = None  # real test set (labels CSV, COCO JSON or WebDataset); the toy world renders one
    seen_data: str | None = None  # real images of the seen labels (toy world: rendered per seed)
    oracle_data: str | None = None  # real images of the unseen labels (toy world: rendered per seed)
    clip: str | None = None  # None: the world's CLIP
    model: str | None = None  # None: the world's text-to-image model
    llm: str = "smollm2"
    prompts_per_set: int = 4
    images_per_prompt: int = 4
    generate_steps: int | None = 10  # denoising steps; None: the model's preset
    # epochs of every trained arm (a real pass then a synthetic pass each): 80, chosen on validation (seeds 1000-1002,
    # both worlds; docs/research/evidence.md) as the shortest budget where neither mlgen's nor the oracle's best
    # epoch is the last one (at 20, 3 of 12 cells selected their last epoch)
    epochs: int = 80
    pass_steps: int = 5  # optimizer steps of EVERY pass: equal real and synthetic steps in every trained arm
    paper_lr: float | None = None  # the paper arm's SGD lr; None: the world's, chosen on validation (else 0.002)
    finetune_steps: int = 30  # +finetune: text-encoder fine-tuning steps
    test_images: int = 400  # toy world: rendered test scenes, drawn anew for every seed
    val_images: int = 200  # toy world: rendered validation scenes per seed (checkpoints and settings chosen there)
    val_data: str | None = None  # your own validation images (checkpoint selection); None: final weights
    seen_images: int = 256  # toy world: rendered seen-label scenes per seed
    oracle_images: int = 512  # toy world: rendered unseen-label scenes per seed (the oracle arm)
    probe_images: int = 768  # toy world: rendered scenes of every label per seed (the probe arm: the ceiling)
    probe_epochs: int = 240  # the probe arm's epochs (pass_steps each): chosen on validation (seeds 1000-1002, both
    # worlds): the best mean, its best epoch interior on every seed (at 120 one seed chose its last)
    probe_data: str | None = None  # your own real images of every label (the probe arm)
    workers: int | None = None  # seeds run at once, one process each; None: one per CPU core on the toy world


STAGE_CONFIGS: dict[str, type] = {
    "prompts": PromptsConfig,
    "generate": GenerateConfig,
    "filter": FilterConfig,
    "classifier": ClassifierConfig,
    "finetune": FinetuneConfig,
    "experiment": ExperimentConfig,
}

ConfigT = TypeVar("ConfigT")


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The YAML config file (safe loader) as a dict of sections; ``{}`` without a file."""
    if path is None:
        return {}
    if not path.is_file():
        raise MlgenError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise MlgenError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MlgenError(f"{path} must be a mapping of sections (prompts:, generate:, filter:, classifier:)")
    unknown = set(data) - set(STAGE_CONFIGS) - {"run", "classes", "rounds"}  # rounds: mlgen.recipe
    if unknown:
        raise MlgenError(f"{path}: unknown section '{sorted(unknown)[0]}'")
    return data


def build_config(cls: type[ConfigT], *layers: dict[str, Any] | None) -> ConfigT:
    """``cls`` from its defaults updated by each layer in turn (later wins; None values skipped)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            name = key.replace("-", "_")
            if name not in names:
                raise MlgenError(f"unknown setting '{key}' for {cls.__name__.removesuffix('Config').lower()}")
            if value is not None:
                values[name] = value
    for name in ("exclude_pairs", "label_sets"):  # YAML and JSON give lists
        if values.get(name) is not None:
            values[name] = tuple(tuple(entry) for entry in values[name])
    config = cls(**values)
    validate(config)
    return config


# Variables every command reads; every other MLGEN_ variable is MLGEN_<SECTION>_<KEY> (one stage's setting).
GLOBAL_ENV = ("MLGEN_RUN", "MLGEN_CONFIG", "MLGEN_CACHE")


def env_name(section: str, key: str) -> str:
    """The environment variable of one stage's setting: ``MLGEN_GENERATE_STEPS``, ``MLGEN_FILTER_CLIP``."""
    return f"MLGEN_{section}_{key}".upper()


def env_settings(section: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The settings of config section ``section`` that ``MLGEN_<SECTION>_<KEY>`` variables set.

    Values are read as YAML scalars (``8``, ``0.5``, ``true``) except for text settings, which stay as written.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(STAGE_CONFIGS[section]):
        raw = environ.get(env_name(section, f.name))
        if raw is None:
            continue
        if str(f.type) in ("str", "str | None"):
            values[f.name] = raw
            continue
        try:
            values[f.name] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise MlgenError(f"{env_name(section, f.name)}={raw!r} is not a value") from None
        if str(f.type).startswith("tuple[str") and isinstance(values[f.name], str):  # one item: not its letters
            values[f.name] = [values[f.name]]
    return values


def warn_unknown_env(environ: dict[str, str] | None = None) -> None:
    """One line for each MLGEN_ variable no stage reads (the old unsectioned names, typos)."""
    environ = os.environ if environ is None else environ
    known = set(GLOBAL_ENV) | {
        env_name(section, f.name) for section, cls in STAGE_CONFIGS.items() for f in dataclasses.fields(cls)
    }
    for name in sorted(environ):
        if name.startswith("MLGEN_") and name not in known and not name.startswith("MLGEN_TEST_"):
            key = name.removeprefix("MLGEN_").lower()
            sections = [s for s, cls in STAGE_CONFIGS.items() if key in {f.name for f in dataclasses.fields(cls)}]
            hint = ", ".join(env_name(s, key) for s in sections) or "MLGEN_<SECTION>_<KEY>"
            print(f"mlgen: warning: {name} is not read; settings are per stage: {hint}", file=sys.stderr)


def stage_settings(
    cls: type[ConfigT], section: str, file_section: dict[str, Any] | None, flags: dict[str, Any]
) -> ConfigT:
    """A stage's settings: defaults < config file section < MLGEN_<SECTION>_<KEY> environment < flags."""
    return build_config(cls, file_section, env_settings(section), flags)


NUMERIC_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float}


def validate(config: Any) -> None:
    """Reject values no stage can use, with one line naming the setting."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = NUMERIC_TYPES.get(str(f.type))
        if value is None or kind is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise MlgenError(f"setting '{f.name}' must be a {'whole ' if kind is int else ''}number, got {value!r}")
        if kind is int and f.name not in ("seed", "first_seed", "request_retries") and value <= 0:
            raise MlgenError(f"setting '{f.name}' must be a positive number, got {value}")
    checks = {
        "threshold": lambda v: 0 <= v <= 1,
        "extra_threshold": lambda v: 0 <= v <= 1,
        "gate": lambda v: 0 <= v <= 1,
        "min_keep": lambda v: 0 <= v <= 1,
        "prototype": lambda v: 0 <= v <= 1,
        "rule": lambda v: v in ("exact", "topk"),
        "text": lambda v: v in ("bare", "ensemble", "s3", "best"),
        "holdout": lambda v: 0 <= v < 1,
        "val_holdout": lambda v: 0 <= v < 1,
        "select": lambda v: v in ("validation", "official", "both"),
        "soft_targets": lambda v: 0 <= v <= 1,
        "temperature": lambda v: v >= 0,
        "top_p": lambda v: 0 < v <= 1,
        "lr": lambda v: v > 0,
        "request_timeout": lambda v: v > 0,
        "image_format": lambda v: v in ("jpg", "png", "webp"),
        "jpeg_quality": lambda v: 1 <= v <= 100,
        "shard_size": lambda v: v <= 10_000,  # sample keys have four digits for the index
        "dtype": lambda v: v in ("auto", "fp32", "fp16", "bf16"),
        "source": lambda v: v in ("filtered", "raw"),
        "head_init": lambda v: v in ("text", "random"),
        "head": lambda v: v in ("linear", "dualcoop", "cprfl"),
        "loss": lambda v: v in ("asl", "mlcd", "bce"),
        "schedule": lambda v: v in ("official", "mixed", "alternating"),
        "optimizer": lambda v: v in ("sgd", "adamw"),
        "dualcoop_scoring": lambda v: v in ("dense", "pooled"),
        "cprfl_recipe": lambda v: v in ("mlgen", "official"),
        "dedup_threshold": lambda v: 0 < v <= 1,
        "synonym_threshold": lambda v: -1 <= v <= 1,
        "prompt_style": lambda v: v in ("mlgen", "paper", "plain"),
        "synonym_source": lambda v: v in ("lexicon", "llm", "both"),
    }
    for name, ok in checks.items():
        if hasattr(config, name) and getattr(config, name) is not None and not ok(getattr(config, name)):
            raise MlgenError(f"setting '{name}' has an invalid value: {getattr(config, name)!r}")
    if isinstance(config, ClassifierConfig):
        check_soft_targets(config)
    if isinstance(config, FilterConfig) and config.prototype and config.text == "s3":
        raise MlgenError("--prototype blends one text embedding per label: use --text bare, ensemble or best, not s3")


def check_soft_targets(config: ClassifierConfig) -> None:
    """Soft targets read the teacher probabilities the filter stores with each kept image, and need a loss that
    takes a target between 0 and 1 (MLCD discriminates sets of positives: a soft target would be a negative)."""
    if not config.soft_targets:
        return
    if config.source != "filtered":
        raise MlgenError(
            f"--soft-targets needs the filter's teacher scores, which --source {config.source} images do not have: "
            "use --source filtered or --soft-targets 0"
        )
    if config.loss == "mlcd":
        raise MlgenError("--soft-targets needs --loss asl or bce: mlcd trains on sets of positive labels only")


def output_settings(config: Any) -> dict[str, Any]:
    """The settings that shape a stage's output (recorded in its plan)."""
    settings = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("omit_when_default") and getattr(config, f.name) == f.default:
            continue
        if f.metadata.get("shapes_output", True):
            value = getattr(config, f.name)
            settings[f.name] = (
                [list(v) for v in value]  # as JSON stores them, so a recorded plan compares equal
                if f.name in ("exclude_pairs", "label_sets") and value is not None
                else value
            )
    return settings


def as_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    for name in ("exclude_pairs", "label_sets"):
        if data.get(name) is not None:
            data[name] = [list(entry) for entry in data[name]]
    return data
