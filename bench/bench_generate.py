"""Generation speed, as ratios against baselines measured in the same run (absolute times are noise here).

1. batching: images/s of the generate stage at --batch-size 8 vs --batch-size 1;
2. overhead: the stage's images/s (seeds, rendering, JPEG, tar, manifest, stats; model load
   excluded) over plain diffusers ``pipe(...)`` calls as a user writes them (the same model folder,
   Euler scheduler, negative prompt, batch 8, steps, size, guidance and torch threads; PIL output):
   goal 0.98 or better;
3. memory: peak RSS of a generate run with 10x more prompts over 1x, each in a fresh process: goal < 1.2.

Usage: python bench/bench_generate.py [--images 32] [--steps 10] [--size 128] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlgen.config import PAPER_NEGATIVE_PROMPT, GenerateConfig, PromptsConfig
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.stage import PromptStage
from mlgen.workflow import generate

LABELS = ["zebra", "surfboard", "kite", "bench", "dog", "cat", "car", "tree"]  # 36 label sets


def stage_seconds(images: int, batch_size: int, args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp))
        run_stage(PromptStage(run, PromptsConfig(llm="template"), LABELS))
        config = GenerateConfig(model=args.model, steps=args.steps, size=args.size, shard_size=images,
                                batch_size=batch_size, images_per_prompt=1)  # fmt: skip
        run_stage_prompts_limited(run, images)
        generate(run, config, PromptsConfig(llm="template"))
        # Shard time from the stats files: rendering + encoding + writing, without the model load.
        return sum(json.loads(p.read_text())["seconds"] for p in run.stage_dir("raw").glob("*_stats.json"))


def run_stage_prompts_limited(run: RunDir, images: int) -> None:
    """Keep the first ``images`` prompts so every variant renders the same images."""
    import pyarrow.parquet as pq

    path = run.stage_dir("prompts") / "prompts.parquet"
    pq.write_table(pq.read_table(path).slice(0, images), path)


def user_pipeline(args: argparse.Namespace):
    """The pipeline as a user loads it: plain diffusers, the same model folder, scheduler (Euler) and dtype."""
    from diffusers import AutoPipelineForText2Image, EulerDiscreteScheduler

    from mlgen.models.registry import diffusers_folder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = AutoPipelineForText2Image.from_pretrained(diffusers_folder(args.model), torch_dtype=dtype).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_seconds(pipe, images: int, batch_size: int, args: argparse.Namespace) -> float:
    """The same number of images, batches, steps, size and guidance by plain ``pipe(...)`` calls, one
    seeded generator per image, as a user writes them (nothing of mlgen's in the loop)."""
    device = pipe.device
    texts = [f"A photo of a {a} next to a {b}." for a, b in zip(LABELS * 8, LABELS[1:] * 8, strict=False)][:images]
    made, started = 0, time.perf_counter()
    for start in range(0, images, batch_size):
        batch = texts[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(start + i) for i in range(len(batch))]
        made += len(
            pipe(
                prompt=batch,
                negative_prompt=[PAPER_NEGATIVE_PROMPT] * len(batch),
                num_inference_steps=args.steps,
                height=args.size,
                width=args.size,
                guidance_scale=7.5,
                generator=generators,
            ).images
        )
    assert made == images
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def peak_rss_child(prompts: int, args: argparse.Namespace) -> None:
    """(In a fresh process) generate ``prompts`` images and print the peak RSS in kB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp))
        run_stage(PromptStage(run, PromptsConfig(llm="template"), LABELS))
        path = run.stage_dir("prompts") / "prompts.parquet"
        rows = pq.read_table(path).to_pylist()
        rows = [{**rows[i % len(rows)], "prompt_id": i} for i in range(prompts)]
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
        config = GenerateConfig(model=args.model, steps=2, size=64, shard_size=16, batch_size=8)
        generate(run, config, PromptsConfig(llm="template"))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss(prompts: int, args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--rss-child", str(prompts), "--model", args.model]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child, args)
    pipe = user_pipeline(args)
    bare_seconds(pipe, 8, 8, args)  # warm-up: model cache, kernels
    stage_seconds(8, 8, args)  # the same warm-up for the stage
    # Best of two, alternating, so neither variant profits from running later (warm caches).
    one, eight, bare = float("inf"), float("inf"), float("inf")
    for _ in range(2):
        eight = min(eight, stage_seconds(args.images, 8, args))
        one = min(one, stage_seconds(args.images, 1, args))
        bare = min(bare, bare_seconds(pipe, args.images, 8, args))
    print(f"{args.images} images, {args.steps} steps, {args.size} px, model {args.model}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"stage batch 1 : {args.images / one:6.2f} images/s")
    print(f"stage batch 8 : {args.images / eight:6.2f} images/s   speed-up vs batch 1: {one / eight:.2f}x")
    print(f"plain pipe()  : {args.images / bare:6.2f} images/s")
    print(f"stage images/s / plain pipe() images/s: {bare / eight:.3f}  (goal >= 0.98)")
    small, large = peak_rss(16, args), peak_rss(160, args)
    print(f"peak RSS: 16 prompts {small / 1024:.0f} MiB, 160 prompts {large / 1024:.0f} MiB, "
          f"ratio {large / small:.3f}  (goal < 1.2)")  # fmt: skip
    print(f"README: stage {bare / eight:.2f} of plain pipe() ({args.images / eight:.2f} vs {args.images / bare:.2f} "
          f"images/s), batch 8 {one / eight:.2f}x batch 1, peak RSS 160/16 prompts {large / small:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
