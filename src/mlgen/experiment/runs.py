"""The runs an experiment seed trains from: generated (prompts -> images -> filter) or imported real images.

The prompts are FIXED ACROSS SEEDS: one prompt stage, drawn with prompt seed 0, serves every seed (the LLM is the
slow part on a CPU; a prompt stage per seed would multiply it by the seeds), so the intervals over seeds hold the
scenes, generation and training draws but not the prompts' randomness (``PROMPTS_NOTE``, in every summary):
``shared/prompts-llm`` (every pair of unseen labels, as the paper), ``shared/prompts-template`` (one template
sentence per pair) and ``shared/prompts-singletons`` (one label per set). Each seed's generation runs
(``runs/SEED/NAME``) link to them; generation, fine-tuning, filtering and training draw their seeds from the
seed's ``experiment`` stream. The seed's runs share one feature cache (``runs/SEED/cache``): the seen images are
encoded once per seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlgen import workflow
from mlgen.config import (
    PAPER_NEGATIVE_PROMPT,
    ExperimentConfig,
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    PromptsConfig,
)
from mlgen.experiment.data import Setup, import_run, oracle_set, probe_set, seen_set
from mlgen.pipeline.rundir import RunDir
from mlgen.world.streams import stream_rng

PROMPT_SEED = 0
PROMPTS_NOTE = (
    f"fixed across seeds: one prompt stage (prompt seed {PROMPT_SEED}) serves every seed, so the intervals over "
    "seeds do not include the prompts' randomness"
)
# run name -> shared prompt folder it links
PROMPTS = {
    "mlgen": "llm",
    "finetune": "llm",
    "finetune-best": "llm",
    "template": "template",
    "singletons": "singletons",
}
# fine-tuned run -> the filtered run whose reliability.json gives each label's best name (None: the labels' own)
FINETUNED = {"finetune": None, "finetune-best": "aliases"}
FINETUNE_LR = 1e-4  # toy text encoder (0.1M parameters): the paper's 7e-8 is for SD's 123M over thousands of steps


@dataclass(frozen=True)
class SeedSeeds:
    """The integer seeds one experiment seed gives each of its stages (its ``experiment`` stream)."""

    generate: int
    finetune: int
    classifier: int

    @classmethod
    def of(cls, seed: int) -> SeedSeeds:
        draws = stream_rng("experiment", seed).integers(0, 2**31 - 1, size=3)
        return cls(*(int(x) for x in draws))


def prompts_config(config: ExperimentConfig, setup: Setup, kind: str) -> PromptsConfig:
    toy = setup.world is not None  # the toy text encoder knows none of the paper's negative words
    base = PromptsConfig(
        llm=config.llm,
        prompts_per_set=config.prompts_per_set,
        synonyms_per_label=3,
        max_new_tokens=40,
        sets_per_shard=16,
        seed=PROMPT_SEED,
        negative_prompt="" if toy else PAPER_NEGATIVE_PROMPT,
    )
    if kind == "template":
        return PromptsConfig(**{**base.__dict__, "llm": "template", "prompts_per_set": 1})
    if kind == "singletons":
        return PromptsConfig(**{**base.__dict__, "label_sets": tuple((label,) for label in setup.unseen)})
    return base


def shared_prompts(root: Path, config: ExperimentConfig, setup: Setup, kind: str) -> RunDir:
    """The shared prompt stage ``kind`` (llm, template, singletons), made once for every seed."""
    run = RunDir(root / "shared" / f"prompts-{kind}")
    if run.success("prompts") is None:  # made once before the workers start: they only read it (no lock)
        workflow.make_prompts(run, prompts_config(config, setup, kind), setup.unseen)
    return run


def _pair_sets(n: int) -> int:
    return n * (n + 1) // 2


def images_per_prompt(config: ExperimentConfig, setup: Setup, kind: str) -> int:
    """Equal generated images per arm: the template's one prompt per set and the singletons' fewer sets get
    more images per prompt."""
    n = config.images_per_prompt
    if kind == "template":
        return n * config.prompts_per_set
    if kind == "singletons":
        return math.ceil(n * _pair_sets(len(setup.unseen)) / len(setup.unseen))
    return n


def seed_run(root: Path, seed: int, name: str) -> RunDir:
    """``runs/SEED/NAME`` with the seed's shared feature cache linked in."""
    run = RunDir(root / "runs" / str(seed) / name)
    cache = run.root / "cache" / "classifier-features"
    if not cache.exists():
        shared = root / "runs" / str(seed) / "cache"
        shared.mkdir(parents=True, exist_ok=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(shared, cache.parent), cache)
    return run


def generated_run(root: Path, config: ExperimentConfig, setup: Setup, seed: int, name: str) -> RunDir:
    """Prompts (linked) -> [fine-tuned text encoder] -> images -> filter, for one seed."""
    kind = PROMPTS[name]
    shared = shared_prompts(root, config, setup, kind)
    run = seed_run(root, seed, name)
    link = run.root / "prompts"
    if not link.exists():
        os.symlink(os.path.relpath(shared.stage_dir("prompts"), run.root), link)
    run.write_classes(setup.unseen)
    seeds = SeedSeeds.of(seed)
    if name in FINETUNED:
        _finetune(run, config, setup, seeds.finetune, _best_names(root, config, setup, seed, FINETUNED[name]))
    generate = GenerateConfig(
        model=setup.model,
        images_per_prompt=images_per_prompt(config, setup, kind),
        shard_size=100,
        steps=config.generate_steps,
        image_format="png" if setup.world else "jpg",
        seed=seeds.generate,
    )
    workflow.generate(run, generate, prompts_config(config, setup, kind))
    # Inline decoding: a decoding process costs more to start than a few hundred small images take to decode,
    # and a worker process of `--workers` forking its own decoders took 20 s per filter (measured).
    workflow.filter_images(run, filter_config(setup, run))
    return run


# The filter variants: each re-filters the seed's mlgen images (raw shards and cached embeddings linked, never
# regenerated) with the default filter changed as written; ``files`` options name a file the run writes.
FILTERS: dict[str, dict[str, Any]] = {
    "paper-filter": {"rule": "exact", "text": "bare", "gate": 0.0, "min_keep": 0.0},  # the COCO script's filter
    "filter-topk": {"rule": "topk"},
    "no-gate": {"gate": 0.0},
    "no-fallback": {"min_keep": 0.0},
    "filter-best": {"text": "best"},
    "filter-prototype": {"prototype": 0.5},  # each label's text blended with its images' prototype
    "all-labels": {"competitors": "seen"},  # the seen labels compete in every grouping softmax
    "aliases": {"label_aliases": "world"},  # the world's aliases, as a user who knows them would give them
}


def filter_config(setup: Setup, run: RunDir, changes: dict[str, Any] | None = None) -> FilterConfig:
    """The experiment's filter (the user's default) with ``changes``; ``competitors: seen`` and
    ``label_aliases: world`` become files in ``run`` (the seen labels; the world's aliases of the unseen ones)."""
    changes = dict(changes or {})
    if changes.get("competitors") == "seen":
        path = run.root / "competitors.txt"
        path.write_text("".join(f"{label}\n" for label in setup.seen), encoding="utf-8")
        changes["competitors"] = str(path)
    if changes.get("label_aliases") == "world":
        from mlgen.world.train_clip import RARE_ALIASES

        path = run.root / "aliases.txt"
        path.write_text("".join(f"{k}: {v}\n" for k, v in RARE_ALIASES.items() if k in setup.unseen), "utf-8")
        changes["label_aliases"] = str(path)
    return dataclasses.replace(FilterConfig(clip=setup.clip, workers=0), **changes)


def filtered_variant(
    root: Path, config: ExperimentConfig, setup: Setup, seed: int, name: str, changes: dict[str, Any]
) -> RunDir:
    """``runs/SEED/NAME``: the seed's mlgen images filtered with ``changes`` to the default filter."""
    base = generated_run(root, config, setup, seed, "mlgen")
    run = seed_run(root, seed, name)
    run.write_classes(setup.unseen)
    for linked in ("prompts", "raw", "cache/clip-embeddings"):
        link = run.root / linked
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(base.root / linked, link.parent), link)
    workflow.filter_images(run, filter_config(setup, run, changes))
    return run


def _best_names(
    root: Path, config: ExperimentConfig, setup: Setup, seed: int, source: str | None
) -> dict[str, str] | None:
    """The best names of ``source``'s filtered run (``finetune --names-from`` its reliability.json), or None."""
    if source is None:
        return None
    from mlgen.finetune.names import best_name_setting, read_best_names

    names_run = filtered_variant(root, config, setup, seed, source, FILTERS[source])
    return best_name_setting(read_best_names(names_run.stage_dir("filtered") / "reliability.json", setup.unseen))


def _finetune(
    run: RunDir, config: ExperimentConfig, setup: Setup, seed: int, best_names: dict[str, str] | None = None
) -> None:
    from mlgen.finetune.stage import finetune

    toy = setup.world is not None
    tuning = FinetuneConfig(
        model=setup.model,
        clip=setup.clip,
        size=64 if toy else 512,
        steps=config.generate_steps or 30,
        learning_rate=FINETUNE_LR if toy else FinetuneConfig.learning_rate,
        max_train_steps=config.finetune_steps,
        grad_steps=2,
        seed=seed,
        best_names=best_names,
    )
    finetune(run, tuning)  # writes RUN/text_encoder/, which generate picks up


def real_run(root: Path, config: ExperimentConfig, setup: Setup, seed: int, name: str) -> RunDir:
    """The oracle's (real unseen-label images), the probe's (real images of every label) or seen-only's (real
    seen-label images) run."""
    run = seed_run(root, seed, name)
    if name == "probe":
        return import_run(run, probe_set(config, setup, root, seed), setup.classes)
    if name == "oracle":
        return import_run(run, oracle_set(config, setup, root, seed), setup.unseen)
    return import_run(run, seen_set(config, setup, root, seed), setup.seen)


def prepare(root: Path, config: ExperimentConfig, setup: Setup, seed: int, name: str) -> RunDir:
    if name in FILTERS:
        return filtered_variant(root, config, setup, seed, name, FILTERS[name])
    if name in PROMPTS:
        return generated_run(root, config, setup, seed, name)
    return real_run(root, config, setup, seed, name)
