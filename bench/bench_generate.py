"""Generation speed, as ratios against baselines measured in the same run (absolute times are noise here).

1. batching: images/s of the generate stage at --batch-size 8 vs --batch-size 1;
2. overhead: the stage's images/s (seeds, rendering, JPEG, tar, manifest, stats; model load
   excluded) over a bare diffusers loop rendering the same images (same pipeline, scheduler, negative
   prompt, batches, steps, size): goal 0.98 or better;
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
from mlgen.generate.diffusion import load_pipeline, render, sample_seed
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


def bare_seconds(images: int, batch_size: int, args: argparse.Namespace) -> float:
    """The same images as the stage renders, by a plain loop over the same pipeline."""
    pipe = load_pipeline(args.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"), "auto", "euler")
    texts = [f"A photo of a {a} next to a {b}." for a, b in zip(LABELS * 8, LABELS[1:] * 8, strict=False)][:images]
    started = time.perf_counter()
    for start in range(0, images, batch_size):
        batch = texts[start : start + batch_size]
        seeds = [sample_seed(0, start + i, 0) for i in range(len(batch))]
        render(pipe, batch, [PAPER_NEGATIVE_PROMPT] * len(batch), seeds, args.steps, args.size, 7.5)
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
    bare_seconds(8, 8, args)  # warm-up: model cache, kernels
    # Best of two, alternating, so neither variant profits from running later (warm caches).
    one, eight, bare = float("inf"), float("inf"), float("inf")
    for _ in range(2):
        eight = min(eight, stage_seconds(args.images, 8, args))
        one = min(one, stage_seconds(args.images, 1, args))
        bare = min(bare, bare_seconds(args.images, 8, args))
    print(f"{args.images} images, {args.steps} steps, {args.size} px, model {args.model}")
    print(f"stage batch 1 : {args.images / one:6.2f} images/s")
    print(f"stage batch 8 : {args.images / eight:6.2f} images/s   speed-up vs batch 1: {one / eight:.2f}x")
    print(f"bare diffusers: {args.images / bare:6.2f} images/s")
    print(f"stage images/s / bare images/s: {bare / eight:.3f}  (goal >= 0.98)")
    small, large = peak_rss(16, args), peak_rss(160, args)
    print(f"peak RSS: 16 prompts {small / 1024:.0f} MiB, 160 prompts {large / 1024:.0f} MiB, "
          f"ratio {large / small:.3f}  (goal < 1.2)")  # fmt: skip


if __name__ == "__main__":
    main()
