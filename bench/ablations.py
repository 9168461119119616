"""The paper's ablations in miniature, on the toy world: real-test mAP over seeds, filter on vs off.

Each seed runs the demo's toy pipeline (prompts -> toy generation -> toy-CLIP filter -> a classifier
head from random weights on the toy CLIP's frozen features) in its own run folder, then scores both
classifiers (trained on the kept images, and on every generated image) and the toy CLIP zero-shot on
the same rendered real test scenes. Printed: mean and spread (standard deviation) over the seeds, and
the filter-on / filter-off ratio per seed. Text-encoder fine-tuning and feature fusion rows are not here yet.

Usage: python bench/ablations.py [--seeds 3] [--llm template] [--model toy] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from mlgen.demo import toy_experiment
from mlgen.pipeline.rundir import RunDir

ROWS = (
    ("filtered", "filter on  (classifier on kept images)"),
    ("unfiltered", "filter off (classifier on all images)"),
    ("zero_shot_clip", "toy CLIP zero-shot (reference)"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--llm", default="template", help="template (fast) or smollm2")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        results = [
            toy_experiment(RunDir(root / f"seed-{seed}"), args.llm, args.model, seed)["metrics"]
            for seed in range(args.seeds)
        ]
    print(f"\nreal-test mAP on {args.seeds} seeds (toy world, {args.model} images, {args.llm} prompts)")
    print(f"{'':42} {'mean':>6} {'spread':>7}  per seed")
    for key, title in ROWS:
        values = [m[key]["mAP"] for m in results if key in m]  # no filtered row where the filter kept too few
        if not values:
            continue
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        seeds = " ".join(f"{v:.3f}" for v in values)
        print(f"{title:42} {statistics.mean(values):6.3f} {spread:7.3f}  {seeds}")
    ratios = " ".join(f"{m['filtered']['mAP'] / m['unfiltered']['mAP']:.3f}" for m in results if "filtered" in m)
    print(f"{'filter on / filter off (ratio)':42} {'':6} {'':7}  {ratios}")


if __name__ == "__main__":
    main()
