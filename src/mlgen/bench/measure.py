"""The measurements of ``mlgen bench``: each stage beside the bare library call it wraps, on this machine.

- generate: the stage's images/s (rendering, seeds, JPEG, tar, manifest, stats; model load excluded) and a
  plain diffusers ``pipe(...)`` call rendering the same prompts with the same pipeline, batch, size and steps;
- filter: the stage's images/s (reading tars, decoding, CLIP, decisions, writing) and bare
  ``encode_image`` on batches decoded beforehand;
- finetune: optimizer steps/s of the text-encoder fine-tuning stage (model load excluded);
- memory: peak RSS of this process and peak GPU memory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from mlgen.config import PAPER_NEGATIVE_PROMPT, FilterConfig, FinetuneConfig, GenerateConfig, PromptsConfig
from mlgen.generate.stage import GenerateStage
from mlgen.pipeline.ranks import current_ranks
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.stage import PromptStage

LABELS = ["zebra", "surfboard", "kite", "bench", "dog", "cat", "car", "tree"]  # 36 label sets, one prompt each


PEAKS_GIB: list[float] = []  # the peak GPU memory of each phase that reset the counter (see phase_peak)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_start() -> None:
    """Start a phase's own peak GPU memory, keeping the peak so far for memory()'s overall figure."""
    if torch.cuda.is_available():
        PEAKS_GIB.append(torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()


def phase_peak() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def prompt_run(root: Path, images: int) -> RunDir:
    """A run whose prompt stage holds exactly ``images`` template prompts (one image each)."""
    run = RunDir(root)
    run_stage(PromptStage(run, PromptsConfig(llm="template"), LABELS))
    path = run.stage_dir("prompts") / "prompts.parquet"
    table = pq.read_table(path)
    rows = [{**table.slice(i % table.num_rows, 1).to_pylist()[0], "prompt_id": i} for i in range(images)]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return run


def shard_seconds(folder: Path) -> float:
    return sum(json.loads(p.read_text())["seconds"] for p in folder.glob("*_stats.json"))


def bench_generate(run: RunDir, config: GenerateConfig, images: int) -> tuple[dict[str, Any], GenerateStage]:
    """The generate stage and a bare ``pipe(...)`` on the same prompts; the stage is kept for its pipeline."""
    stage = GenerateStage(run, dataclasses.replace(config, shard_size=images, images_per_prompt=1))
    phase_start()
    stage.setup(current_ranks())
    warm_up(stage)
    setup, stage.setup = stage.setup, lambda ranks: None  # loaded once: the runner must not load it again
    run_stage(stage)
    stage.setup = setup
    stage_s = shard_seconds(run.stage_dir("raw"))
    bare_s = bare_generate_seconds(stage, images)
    c = stage.config
    return {
        "model": c.model,
        "size": stage.size,
        "steps": c.steps,
        "batch_size": stage.batch_size,
        "dtype": str(stage.pipe.unet.dtype).removeprefix("torch."),
        **gpu_paths(stage),
        "images": images,
        "images_per_s": images / stage_s,
        "bare_images_per_s": images / bare_s,
        "ratio": bare_s / stage_s,
        "peak_gpu_gib": phase_peak(),
    }, stage


def gpu_paths(stage: GenerateStage) -> dict[str, Any]:
    """Which of the CUDA paths this pipeline took (the device check asserts them): attention processors,
    VAE slicing and tiling, a compiled UNet."""
    pipe = stage.pipe
    vae = getattr(pipe, "vae", None)
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # a compiled UNet wraps the module
    return {
        "attention": sorted({type(p).__name__ for p in unet.attn_processors.values()}),
        "vae_slicing": bool(getattr(vae, "use_slicing", False)),
        "vae_tiling": bool(getattr(vae, "use_tiling", False)),
        "compiled": stage.config.compile,
    }


def warm_up(stage: GenerateStage) -> None:
    """A small call first: kernel choice and the allocator stay out of the timing. With --compile, full
    batches (compiled shapes) twice, so that compilation is not timed either."""
    c = stage.config
    batch, steps = (stage.batch_size, c.steps) if c.compile else (1, 1)
    for _ in range(2 if c.compile else 1):
        stage.pipe(prompt=["warm-up"] * batch, num_inference_steps=steps, guidance_scale=c.guidance,
                   height=stage.size, width=stage.size, output_type="np")  # fmt: skip
    sync()


def bare_generate_seconds(stage: GenerateStage, images: int) -> float:
    """A plain diffusers loop: the same prompts, seeds, batches, steps and size as the stage rendered."""
    samples = stage.samples(0, images)
    c = stage.config
    sync()
    started = time.perf_counter()
    for start in range(0, images, stage.batch_size):
        batch = samples[start : start + stage.batch_size]
        generators = [torch.Generator(stage.pipe.device).manual_seed(s["seed"]) for s in batch]
        with torch.inference_mode():
            stage.pipe(
                prompt=[s["text"] for s in batch],
                negative_prompt=[PAPER_NEGATIVE_PROMPT] * len(batch),
                num_inference_steps=c.steps,
                guidance_scale=c.guidance,
                height=stage.size,
                width=stage.size,
                generator=generators,
                output_type="np",
            )
    sync()
    return time.perf_counter() - started


def bench_filter(run: RunDir, clip: str) -> dict[str, Any]:
    """The filter stage over the run's raw images, and bare ``encode_image`` over the same images."""
    from mlgen.filters.loader import decoded_batches
    from mlgen.models.registry import load_open_clip
    from mlgen.shards.reader import finished_shards
    from mlgen.workflow import filter_images

    config = FilterConfig(clip=clip)
    filter_images(run, config)
    stage_s = shard_seconds(run.stage_dir("filtered"))
    images = run.success("filtered")["counts"].get("images") or run.success("raw")["counts"]["images"]
    model, preprocess, _ = load_open_clip(clip, current_ranks().device)
    raw = run.stage_dir("raw")
    pixels = [p for s in finished_shards(raw) for _, p in decoded_batches(raw, s, config.batch_size, preprocess, 0)]
    dtype, device = model.logit_scale.dtype, current_ranks().device
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in pixels:
            torch.nn.functional.normalize(model.encode_image(batch.to(device, dtype)).float(), dim=-1).cpu()
    sync()
    bare_s = time.perf_counter() - started
    return {
        "clip": clip,
        "images": images,
        "images_per_s": images / stage_s,
        "bare_images_per_s": images / bare_s,
        "ratio": bare_s / stage_s,
    }


def bench_finetune(run: RunDir, model: str, clip: str, size: int, steps: int, train_steps: int) -> dict[str, Any]:
    """Optimizer steps/s of the fine-tuning stage (setup and model load excluded: the shard's own seconds)."""
    from mlgen.finetune.model import amp_dtype
    from mlgen.finetune.stage import finetune

    config = FinetuneConfig(
        model=model, clip=clip, size=size, steps=steps, max_train_steps=train_steps, save_every=10**6, log_every=1
    )
    device = current_ranks().device
    phase_start()
    finetune(run, config)
    seconds = shard_seconds(run.stage_dir("finetune"))
    precision = amp_dtype(config.mixed_precision, device)
    log = (run.stage_dir("finetune") / "log.csv").read_text(encoding="utf-8").splitlines()
    losses = [float(row["loss"]) for row in csv.DictReader(log)]
    return {
        "size": size,
        "steps": steps,
        "train_steps": train_steps,
        "steps_per_s": train_steps / seconds,
        "mixed_precision": config.mixed_precision,
        "autocast": None if precision is None else str(precision).removeprefix("torch."),
        "gradient_checkpointing": config.gradient_checkpointing,
        "losses": losses,
        "peak_gpu_gib": phase_peak(),
    }


def memory() -> dict[str, Any]:
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    gpu = max([*PEAKS_GIB, torch.cuda.max_memory_allocated() / 2**30]) if torch.cuda.is_available() else None
    return {"peak_rss_gib": round(rss_gib, 2), "peak_gpu_gib": None if gpu is None else round(gpu, 2)}
