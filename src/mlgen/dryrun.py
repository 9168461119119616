"""``mlgen run --dry-run``: what a config would run, how long it would take and the disk it needs.

Nothing is loaded (no model, no LLM) and nothing is written: label sets are composed as the prompt stage
would, counts follow from the settings, time comes from a ``bench.json`` written by ``mlgen bench`` (scaled
to the config's size and steps), disk from typical encoded sizes per pixel.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlgen.config import (
    STAGE_CONFIGS,
    ClassifierConfig,
    FilterConfig,
    FinetuneConfig,
    GenerateConfig,
    PromptsConfig,
    build_config,
    env_settings,
)
from mlgen.errors import MlgenError
from mlgen.generate.draw import draw_shares
from mlgen.generate.presets import apply_preset
from mlgen.pipeline.rundir import RunDir
from mlgen.prompts.composer import compose_sets

# Encoded bytes per pixel of a generated photo-like image (jpg at quality 95, png, webp): typical SD output.
BYTES_PER_PIXEL = {"jpg": 0.4, "png": 1.6, "webp": 0.3}
SECTIONS = {
    "prompts": PromptsConfig,
    "generate": GenerateConfig,
    "filter": FilterConfig,
    "classifier": ClassifierConfig,
}


@dataclass(frozen=True)
class Job:
    """What one config asks for, in numbers."""

    classes: list[str]
    label_sets: list[tuple[str, ...]]
    method: str
    prompts_per_set: int
    images: int
    per_label: Counter
    shards: int
    generate: GenerateConfig
    sections: dict[str, Any]
    finetune: FinetuneConfig | None
    quota: int | None


def dry_run_lines(
    data: dict[str, Any],
    run: RunDir,
    classes: list[str] | None,
    quota: int | None,
    bench_path: Path | None,
    benchmark: Any = None,
    implied: dict[str, Any] | None = None,
) -> list[str]:
    """What ``mlgen run`` would do with this config (``data``: the config file's sections; ``benchmark``: the
    ``--data`` benchmark it reproduces, whose ``implied`` classifier settings go under the config's)."""
    for name, cls in STAGE_CONFIGS.items():  # every section, used by `run` or not: a typo fails now
        build_config(cls, implied if name == "classifier" else None, data.get(name), env_settings(name))
    job = plan_job(data, classes or run.classes(), quota, implied)
    if bench_path is None:  # the run's own, else the one `mlgen bench` left in this folder
        bench_path = next((p for p in (run.root / "bench.json", Path("bench.json")) if p.is_file()), None)
    elif not bench_path.is_file():
        raise MlgenError(f"bench file not found: {bench_path}")
    lines = describe(job, read_bench(bench_path), bench_path)
    return lines + (benchmark_lines(job, benchmark) if benchmark is not None else [])


def benchmark_lines(job: Job, spec: Any) -> list[str]:
    """What ``--data`` adds: the real images trained on, the splits scored and how the epochs are chosen."""
    c = job.sections["classifier"]
    on = {
        "validation": "validation",
        "official": "the TEST split (as the official code)",
        "both": "validation and, beside, on the TEST split (as the official code)",
    }[c.select]
    val = c.val_data or (f"{c.val_holdout:.0%} of seen-train held out" if c.val_holdout else "none: final weights")
    return [
        f"benchmark   {spec}: {len(job.classes)} unseen labels generated; real images of {c.seen_data}",
        f"            scored on {spec}:unseen-test (ZSL) and :gzsl-test (GZSL), mAP with AP 0 for a label without",
        "            positives, test images squash-resized to the input side (bilinear), as the official code",
        f"selection   epochs chosen on {on}; validation: {val}"
        + ("; official: best test F1@3, a ZSL and a GZSL checkpoint" if c.select != "validation" else ""),
    ]


def plan_job(data: dict[str, Any], classes: list[str], quota: int | None, implied: dict | None = None) -> Job:
    """Every section built (an unknown key fails here, with one line) and the counts it implies."""
    sections = {
        name: build_config(cls, implied if name == "classifier" else None, data.get(name), env_settings(name))
        for name, cls in SECTIONS.items()
    }
    finetune = build_config(FinetuneConfig, data["finetune"], env_settings("finetune")) if "finetune" in data else None
    p, g = sections["prompts"], apply_preset(sections["generate"])
    sets, method = compose_sets(classes, p.exclude_pairs, p.set_size, p.sets_per_label, p.label_sets, p.seed)
    per_set = 1 if p.llm == "template" else p.prompts_per_set  # the template writes one prompt per set
    if quota is not None:
        images_of = _first_round(classes, sets, quota, g.seed)
    elif method == "pairs":  # the generate stage draws each image's set (mlgen.generate.stage): expected counts
        total = len(sets) * per_set * g.images_per_prompt
        images_of = {i: total * share for i, share in enumerate(draw_shares(classes, sets))}
    else:
        images_of = {i: per_set * g.images_per_prompt for i in range(len(sets))}
    per_label: Counter = Counter()
    for i, count in images_of.items():
        per_label.update({label: count for label in set(sets[i])})
    per_label = Counter({label: round(count) for label, count in per_label.items()})
    images = round(sum(images_of.values()))
    shards = math.ceil(images / g.shard_size)
    return Job(classes, sets, method, per_set, images, per_label, shards, g, sections, finetune, quota)


def _first_round(classes: list[str], sets: list[tuple[str, ...]], quota: int, seed: int) -> dict[int, int]:
    """Images per label set of quota round 1 (the same draw as ``mlgen.generate.rounds``)."""
    import numpy as np

    from mlgen.generate.rounds import draw_sets

    known = {frozenset(s): i for i, s in enumerate(sets)}
    drawn = draw_sets(np.random.default_rng([seed, 1]), list(classes), known, dict.fromkeys(classes, quota))
    return dict(drawn)


def read_bench(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise MlgenError(f"{path} is not a bench.json written by `mlgen bench`") from None


def projected_seconds(job: Job, bench: dict[str, Any]) -> dict[str, float]:
    """Seconds per stage, from bench figures scaled to the job's size and steps (time ~ pixels x steps)."""
    g, measured = job.generate, bench["generate"]
    size = g.size or measured["size"]
    scale = (size / measured["size"]) ** 2 * (g.steps or measured["steps"]) / measured["steps"]
    out = {"generate": job.images * scale / measured["images_per_s"]}
    if bench.get("filter"):
        out["filter"] = job.images / bench["filter"]["images_per_s"]
    if job.finetune is not None and bench.get("finetune"):
        out["finetune"] = job.finetune.max_train_steps / bench["finetune"]["steps_per_s"]
    return out


def disk_bytes(job: Job) -> dict[str, float]:
    """Raw images, the filtered copy (at most all of them) and the filter's float16 embedding cache."""
    g = job.generate
    side = g.size or 512
    raw = job.images * side * side * BYTES_PER_PIXEL[g.image_format]
    return {"raw": raw, "filtered (at most)": raw, "caches": job.images * 1024 * 2 * 2}


def describe(job: Job, bench: dict[str, Any] | None, bench_path: Path | None) -> list[str]:
    """The lines ``--dry-run`` prints."""
    g, s = job.generate, job.sections
    per_label = ", ".join(f"{label} {job.per_label[label]}" for label in job.classes)
    lines = [
        "dry run: nothing is loaded or written",
        f"labels      {len(job.classes)}: {', '.join(job.classes)}",
        f"label sets  {len(job.label_sets)} ({job.method})",
        f"prompts     {len(job.label_sets) * job.prompts_per_set} "
        f"({job.prompts_per_set} per set, llm {s['prompts'].llm})",
    ]
    if job.quota is None:
        if job.method == "pairs":  # each image draws its label set: the counts per label are expected values
            lines.append(f"images      {job.images} ({g.images_per_prompt} per prompt, each image's label set drawn);")
            lines.append(f"            per label about: {per_label}")
        else:
            lines.append(f"images      {job.images} ({g.images_per_prompt} per prompt); per label: {per_label}")
    else:
        lines.append(f"images      round 1: {job.images} (quota {job.quota} kept per label; later rounds make up")
        lines.append(f"            what the filter drops); round 1 per label: {per_label}")
    lines += [
        f"shards      raw {job.shards} x {g.shard_size} images; filtered {job.shards}",
        f"generate    {g.model} (preset {g.preset}: {g.size or 'native'} px, {g.steps} steps, {g.scheduler}, "
        f"guidance {g.guidance})",
        _filter_line(s["filter"]),
        f"classifier  CLIP {s['classifier'].clip}, head {s['classifier'].head}"
        + (" + fusion" if s["classifier"].fusion else "")
        + f", {s['classifier'].optimizer or 'sgd'} lr {s['classifier'].lr or 'default'}, "
        f"batch {s['classifier'].batch_size}, "
        + (f"{s['classifier'].steps} steps" if s["classifier"].steps else f"{s['classifier'].epochs} epochs"),
    ]
    if job.finetune is not None:
        f = job.finetune
        lines.append(f"finetune    {f.model} text encoder, CLIP {f.clip}, {f.max_train_steps} steps at {f.size} px")
    lines += _time_lines(job, bench, bench_path)
    disk = disk_bytes(job)
    parts = ", ".join(f"{name} {_size(value)}" for name, value in disk.items())
    lines.append(f"disk        about {_size(sum(disk.values()))} ({parts}; {g.image_format} at {g.size or 512} px)")
    return lines


def _filter_line(f: FilterConfig) -> str:
    rule = f"top-{f.topk or 'auto'} (extra labels above {f.extra_threshold})" if f.rule == "topk" else "exact set"
    parents = f", parents {f.parents}" if f.parents else ""
    return (
        f"filter      CLIP {f.clip}, rule {rule}, threshold {f.threshold}, text {f.text}, gate {f.gate}, "
        f"min-keep {f.min_keep}{parents}"
    )


def _time_lines(job: Job, bench: dict[str, Any] | None, bench_path: Path | None) -> list[str]:
    if bench is None:
        g = job.generate
        return [
            "time        unknown: no bench.json (run `mlgen bench` with these models, then --bench FILE)",
            f"GPU hours   unknown: on the GPU to book, `mlgen bench --model {g.model} --size {g.size or 512} "
            f"--steps {g.steps} --dtype {g.dtype}` (or --arch sd2: the architecture with random weights) measures it",
        ]
    seconds = projected_seconds(job, bench)
    parts = ", ".join(f"{stage} {_duration(value)}" for stage, value in seconds.items())
    measured = bench["generate"]
    source = (
        f"{bench_path}: {measured['model']} at {measured['size']} px, {measured['steps']} steps on {bench['device']}"
    )
    hours = sum(seconds.values()) / 3600
    first = " (round 1; later rounds add what the filter drops)" if job.quota is not None else ""
    return [
        f"time        about {_duration(sum(seconds.values()))} ({parts}; from {source})",
        f"GPU hours   about {hours:.1f}{first}; classifier training not included",
    ]


def _size(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
