"""DualCoOp training steps that score a pass's own columns, against the same steps computing every class's
prompts and then dropping the unscored columns (the former way), as a ratio from one run; and scoring batches
with the prompt features computed once, against computing them for every batch (the former way).

NUS-WIDE's shape: 1,006 labels (here 81 real unseen names and placeholders for the 925 seen ones), a real batch
scored on 100 seen labels drawn at random, a synthetic batch on the 81 unseen ones. Features are cached (the
frozen encoder's), so a step is the head's work: the text encoder over 2 x C prompts, then the region scoring.

    PYTHONPATH=src python bench/dualcoop_columns.py [--clip tiny|random:RN50|NAME] [--steps 6] [--batch-size 32]

``random:ARCH`` is the open_clip architecture with random weights (real compute, no download).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from filter import random_weights_clip  # bench/filter.py (this folder is on the path when run as a script)
from mlgen.classifiers.benchmarks import shipped
from mlgen.classifiers.losses import make_loss
from mlgen.classifiers.model import HeadOptions, build_classifier, load_clip


def timed_steps(model, features, targets, passes, steps: int, some: bool) -> float:
    """Seconds per optimizer step, alternating the passes' column masks."""
    loss = make_loss("asl", "dualcoop", model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    started = time.perf_counter()
    for step in range(steps):
        columns = passes[step % len(passes)]
        optimizer.zero_grad()
        logits = model.forward_features(features, columns) if some else model.forward_features(features)[:, columns]
        loss(logits, targets[:, columns]).backward()
        optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def timed_scoring(model, features, batches: int, once: bool) -> float:
    """Seconds per scored batch (no gradients), every class; ``once=False`` forgets the prompt features first."""
    model.head._scoring = None  # the first batch computes them in both ways
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(batches):
            if not once:
                model.head._scoring = None
            model.forward_features(features)
    return (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context", type=int, default=4, help="learned context tokens (official 64)")
    parser.add_argument("--seen-labels", type=int, default=925, help="NUS-WIDE's 925; fewer where memory is short")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unseen = shipped("nus_81_unseen")
    classes = unseen + [f"seen label {i}" for i in range(args.seen_labels)]
    name = args.clip
    if name.startswith("random:"):
        name = random_weights_clip(name.removeprefix("random:"), Path(tempfile.mkdtemp()) / "clip")
    clip_model, _, tokenizer = load_clip(name, device)
    options = HeadOptions(prompt_context=args.context)
    model = build_classifier(clip_model, tokenizer, classes, "dualcoop", False, device, options=options)
    size = clip_model.visual.image_size
    side = size[0] if isinstance(size, tuple | list) else size
    pixels = torch.randn(args.batch_size, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    features = model.frozen_features(pixels)
    targets = (torch.rand(args.batch_size, len(classes), generator=torch.Generator().manual_seed(1)) < 0.05).float()
    targets = targets.to(device)
    synthetic = torch.tensor([i < len(unseen) for i in range(len(classes))])
    drawn = torch.randperm(args.seen_labels, generator=torch.Generator().manual_seed(2))[:100] + len(unseen)
    real = torch.zeros(len(classes), dtype=torch.bool)
    real[drawn] = True
    passes = [real.to(device), synthetic.to(device)]
    timed_steps(model, features, targets, passes, 2, True)  # warm-up (kernels, allocator)
    every = timed_steps(model, features, targets, passes, args.steps, False)
    some = timed_steps(model, features, targets, passes, args.steps, True)
    print(f"DualCoOp, CLIP {args.clip}, {device}, {len(classes)} classes, passes of 100 and 81 columns, "
          f"batch {args.batch_size}, {args.steps} steps each")  # fmt: skip
    print(f"step: every class's prompts {every:.3f}s, the scored columns' {some:.3f}s: {every / some:.1f}x faster")
    batches = args.steps * 4
    again = timed_scoring(model, features, batches, False)
    once = timed_scoring(model, features, batches, True)
    print(f"scoring {batches} batches: prompts per batch {again:.3f}s a batch, prompts once {once:.3f}s: "
          f"{again / once:.1f}x faster (a test split has thousands of batches)")  # fmt: skip


if __name__ == "__main__":
    main()
