"""The filter audit's judge alone on the toy world: per seed, the lr and steps it chose on its held-out judge data
(with the grid), and per label its AP on the experiment's test scenes and its false-positive rate on test scenes
that hold the label's same-colour partner but not the label. No generation: seconds per seed.

Usage: python bench/judge.py [--seeds 3] [--world toy] [--unseen circle,triangle,star,heart] [--grid]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from mlgen.config import ClassifierConfig, ExperimentConfig
from mlgen.experiment import cells, data
from mlgen.experiment.audit import figures_on_test, partners, train_judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--world", default="toy")
    parser.add_argument("--unseen", default="circle,triangle,star,heart")
    parser.add_argument("--grid", action="store_true", help="print the held-out mAP of every (lr, steps)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ExperimentConfig(world=args.world, unseen=args.unseen)
    setup = data.resolve(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "experiment"
        test = cells.TestSet.load(data.test_set(config, setup, root), setup)
        ctx = cells.Context(root, config, setup, ClassifierConfig(), test)
        rows = []
        for seed in range(args.seeds):
            judge, labels, features = train_judge(ctx, seed)
            logits = judge(features(test.images))
            figures = figures_on_test(logits, test.targets, test.classes, labels, judge.thresholds, partners(ctx))
            print(f"seed {seed}: lr {judge.tuning['lr']:g}, steps {judge.tuning['steps']} (held-out mAP)")
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
