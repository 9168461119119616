"""Fine-tuning cost of the memory knobs, as ratios against a baseline measured in the same run.

Variants (each in a fresh process, so its peak memory is its own):
  grad-steps-1   backpropagate through the last denoising step only (--grad-steps 1)
  all-steps      backpropagate through every denoising step (the baseline)
  all-steps+gc   every step, with gradient checkpointing of the UNet and VAE decoder

Per variant: training steps/s and the peak memory of training beyond the loaded models
(CUDA: max allocated; CPU: resident memory sampled every ms, above its level once the models are loaded).

Usage: python bench/finetune.py [--size 256] [--steps 8] [--train-steps 3] [--model tiny] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

VARIANTS = {
    "grad-steps-1": {"grad_steps": 1, "gradient_checkpointing": False},
    "all-steps": {"grad_steps": None, "gradient_checkpointing": False},
    "all-steps+gc": {"grad_steps": None, "gradient_checkpointing": True},
}
BASELINE = "all-steps"


def rss_mib() -> float:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """The highest resident memory above the level at start, sampled every millisecond in a thread."""

    def __init__(self) -> None:
        self.start, self.peak = rss_mib(), 0.0
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mib() - self.start)
            time.sleep(0.001)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.train_steps`` steps (after one warm-up step) in this process."""
    from mlgen.config import FinetuneConfig, PromptsConfig
    from mlgen.finetune.stage import FinetuneStage, every_rank
    from mlgen.pipeline.rundir import RunDir
    from mlgen.pipeline.runner import run_stage
    from mlgen.prompts.stage import PromptStage

    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp))
        run_stage(PromptStage(run, PromptsConfig(llm="template"), ["zebra", "kite", "surfboard"]))
        config = FinetuneConfig(
            model=args.model, clip="tiny", size=args.size, steps=args.steps, learning_rate=1e-4, **VARIANTS[variant]
        )
        stage = FinetuneStage(run, config)
        ranks = every_rank()
        stage.setup(ranks)
        cuda = ranks.device.type == "cuda"
        sampler = PeakRss()
        stage.train_step(1)  # warm-up: lazy allocations, kernel selection
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loaded = torch.cuda.memory_allocated() / 2**20
        started = time.perf_counter()
        for step in range(2, args.train_steps + 2):
            stage.train_step(step)
        seconds = time.perf_counter() - started
        rss_peak = sampler.stop()
        peak = torch.cuda.max_memory_allocated() / 2**20 - loaded if cuda else rss_peak
        return {"steps_per_s": args.train_steps / seconds, "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the variants; the best one counts")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):  # rounds alternate the variants, so a busy moment hits them alike
        for variant in VARIANTS:
            child = [sys.executable, __file__, "--variant", variant, "--size", str(args.size), "--steps",
                     str(args.steps), "--train-steps", str(args.train_steps), "--model", args.model]  # fmt: skip
            output = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            runs[variant].append(json.loads(output.strip().splitlines()[-1]))
    results = {  # the best of the rounds: the least disturbed one
        v: {"steps_per_s": max(r["steps_per_s"] for r in rs), "peak_mib": min(r["peak_mib"] for r in rs)}
        for v, rs in runs.items()
    }
    base = results[BASELINE]
    print(f"finetune memory knobs: {args.model}, {args.size} px, {args.steps} denoising steps, "
          f"{args.train_steps} timed training steps; ratios vs {BASELINE}")  # fmt: skip
    for variant, r in results.items():
        print(
            f"  {variant:<13} steps/s x{r['steps_per_s'] / base['steps_per_s']:.2f}   "
            f"peak training memory x{r['peak_mib'] / base['peak_mib']:.2f}   "
            f"({r['steps_per_s']:.2f} steps/s, {r['peak_mib']:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
