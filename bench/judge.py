"""The filter audit's judge alone on the toy world: per seed, the lr and steps it chose on its held-out judge data
(with the grid), and per label its AP on the experiment's test scenes and its false-positive rate on test scenes
that hold the label's same-colour partner but not the label. No generation: seconds per seed.

``--first`` measures the first judge instead (before issue 23): trained on the seed's 512 oracle scenes of the
unseen shapes only, Adam lr 0.03 for 1000 steps, threshold logit 0.

Usage: python bench/judge.py [--seeds 3] [--world toy] [--unseen circle,triangle,star,heart] [--grid] [--first]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from mlgen.classifiers.evaluate import load_eval_set
from mlgen.config import ClassifierConfig, ExperimentConfig
from mlgen.experiment import cells, data
from mlgen.experiment.audit import Judge, _train_probe, figures_on_test, partners, teacher_features, train_judge


def first_judge(ctx: cells.Context, seed: int) -> tuple[Judge, list[str], object]:
    """The judge as it was before issue 23, on the same teacher features."""
    features = teacher_features(ctx)
    unseen = ctx.setup.unseen
    images, targets, _ = load_eval_set(data.oracle_set(ctx.config, ctx.setup, ctx.root, seed), unseen)
    probe = _train_probe(features(images), targets, seed, 3e-2, [1000])[1000]
    tuning = {"lr": 3e-2, "steps": 1000, "tuning": []}
    return Judge(probe, np.zeros(len(unseen)), [{}] * len(unseen), tuning), unseen, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--world", default="toy")
    parser.add_argument("--unseen", default="circle,triangle,star,heart")
    parser.add_argument("--grid", action="store_true", help="print the held-out mAP of every (lr, steps)")
    parser.add_argument("--first", action="store_true", help="the first judge (unseen shapes only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ExperimentConfig(world=args.world, unseen=args.unseen)
    setup = data.resolve(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "experiment"
        rows = []
        for seed in range(args.seeds):
            ctx = cells.Context(root, config, setup, ClassifierConfig()).for_seed(seed)  # the seed's own test draw
            test = ctx.test
            judge, labels, features = (first_judge if args.first else train_judge)(ctx, seed)
            logits = judge(features(test.images))
            figures = figures_on_test(logits, test.targets, test.classes, labels, judge.thresholds, partners(ctx))
            print(f"seed {seed}: lr {judge.tuning['lr']:g}, steps {judge.tuning['steps']}")
            for entry in judge.tuning["tuning"] if args.grid else []:
                print(f"  lr {entry['lr']:g} steps {entry['steps']}: {entry['heldout_map']:.4f}")
            rows.append({label: figures[label] for label in setup.unseen})
    print("\n| label | partner | test AP (mean over seeds) | false positive on partner scenes | partner scenes |")
    print("|---|---|---|---|---|")
    for label in setup.unseen:
        ap = np.mean([r[label]["test_ap"] for r in rows])
        fp = [r[label]["partner_false_positive"] for r in rows if r[label]["partner_false_positive"] is not None]
        shown = f"{100 * np.mean(fp):.0f}% ({', '.join(f'{100 * v:.0f}' for v in fp)})" if fp else "-"
        first = rows[0][label]
        print(f"| {label} | {first['partner'] or '-'} | {ap:.3f} | {shown} | {first['partner_scenes']} |")


if __name__ == "__main__":
    main()
