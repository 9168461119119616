"""The paper's ablations in miniature, on the toy world: real-test mAP over seeds.

Each seed runs the demo's toy pipeline (prompts -> toy generation -> toy-CLIP filter -> a classifier
head from random weights on the toy CLIP's frozen features) in its own run folder and scores, on the
same rendered real test scenes:
- the classifier trained on the kept images (filter on) and on every generated image (filter off);
- the filter-on classifier with the feature fusion modules trained inside the frozen encoder;
- the filter-on classifier of a second run whose toy text encoder was first fine-tuned with the
  CLIP-score discriminative loss (``--finetune-steps``; 0 leaves the row out), with the share of its
  generated images the filter keeps beside the plain run's;
- the toy CLIP zero-shot (the teacher that filters; trained on these shapes, so it is the ceiling here).
Printed: mean and spread (standard deviation) over the seeds, and the per-seed values.

Usage: python bench/ablations.py [--seeds 3] [--llm template] [--model toy] [--finetune-steps 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mlgen.demo import toy_experiment
from mlgen.pipeline.rundir import RunDir

ROWS = (
    ("plain", "filtered", "filter on  (classifier on kept images)"),
    ("plain", "unfiltered", "filter off (classifier on all images)"),
    ("plain", "fusion", "filter on + feature fusion"),
    ("finetuned", "filtered", "filter on + fine-tuned text encoder"),
    ("plain", "zero_shot_clip", "toy CLIP zero-shot (reference)"),
)


def kept_share(result: dict) -> float:
    counts = result["filtered"]["counts"]
    return counts["kept"] / max(counts["kept"] + counts["dropped"], 1)


def summary(title: str, values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    seeds = " ".join(f"{v:.3f}" for v in values)
    return f"{title:42} {statistics.mean(values):6.3f} {spread:7.3f}  {seeds}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--llm", default="template", help="template (fast) or smollm2")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--finetune-steps", type=int, default=60, help="text-encoder fine-tuning steps; 0: skip")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"plain": [], "finetuned": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for seed in range(args.seeds):
            runs["plain"].append(toy_experiment(RunDir(root / f"seed-{seed}"), args.llm, args.model, seed, fusion=True))
            if args.finetune_steps:
                finetuned = RunDir(root / f"seed-{seed}-finetuned")
                runs["finetuned"].append(toy_experiment(finetuned, args.llm, args.model, seed, args.finetune_steps))
    print(f"\nreal-test mAP on {args.seeds} seeds (toy world, {args.model} images, {args.llm} prompts)")
    print(f"{'':42} {'mean':>6} {'spread':>7}  per seed")
    for variant, key, title in ROWS:
        values = [r["metrics"][key]["mAP"] for r in runs[variant] if key in r["metrics"]]  # a filter may keep too few
        if values:
            print(summary(title, values))
    print("\nshare of generated images the filter keeps")
    print(summary("toy text encoder as shipped", [kept_share(r) for r in runs["plain"]]))
    if runs["finetuned"]:
        print(summary(f"fine-tuned ({args.finetune_steps} steps)", [kept_share(r) for r in runs["finetuned"]]))


if __name__ == "__main__":
    main()
