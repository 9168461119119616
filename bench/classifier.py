"""Classifier training speed, as ratios from one run: an epoch with the feature cache over one without it
(goal >= 10x for linear and cprfl), and the training samples/s of each head; each timing follows an
untimed warm-up epoch of its own.

Without the cache every epoch decodes, preprocesses and encodes each image; with it an epoch reads the stored
float16 features. Images are rendered toy-world scenes (``mlgen world render``) streamed like shards.

    PYTHONPATH=src python bench/classifier.py [--clip tiny|toy|RN50/openai|...] [--images 256] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mlgen.classifiers.cache import FeatureCache
from mlgen.classifiers.model import build_classifier, load_clip
from mlgen.classifiers.source import Source, labelled_samples, multi_hot
from mlgen.classifiers.train import fit
from mlgen.world.render import SHAPES, render_dataset


def timed_fit(model, source: Source, epochs: int, batch_size: int) -> float:
    """Seconds per epoch of ``fit`` over ``source``."""
    started = time.perf_counter()
    fit(model, lambda e: source.batches(e, batch_size, 0), epochs, steps_per_epoch=len(source) // batch_size + 1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="tiny")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="rendered image side (the encoder's input size)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = list(SHAPES)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        labels_csv = render_dataset(root / "images", args.images, 0, size=args.size) / "labels.csv"
        labels, images, _ = labelled_samples(labels_csv)
        targets = multi_hot(labels, classes)
        rows = torch.ones(len(labels), dtype=torch.bool)
        print(f"{args.images} images {args.size}px, CLIP {args.clip}, {device}, {args.epochs} epochs each")
        speed, ratio = {}, {}
        for head, fusion in (("linear", False), ("cprfl", False), ("dualcoop", False), ("linear", True)):
            clip_model, preprocess, tokenizer = load_clip(args.clip, device)
            model = build_classifier(clip_model, tokenizer, classes, head, fusion, device)
            name = f"{head}{' + fusion' if fusion else ''}"
            streaming = Source(targets, rows, images=images, preprocess=preprocess)
            timed_fit(model, streaming, 1, args.batch_size)  # warm-up epoch (kernels, allocator, file cache)
            streamed = timed_fit(model, streaming, args.epochs, args.batch_size)
            if not model.cacheable:
                speed[name] = args.images / streamed
                print(f"{name:<16} no cache (fusion trains)  epoch {streamed:.2f}s")
                continue
            cache = FeatureCache(root, args.clip, model)
            started = time.perf_counter()
            features = cache.features(images(), preprocess, args.batch_size)
            filling = time.perf_counter() - started
            cached_source = Source(targets, rows, features=features)
            timed_fit(model, cached_source, 1, args.batch_size)  # the same warm-up
            cached = timed_fit(model, cached_source, args.epochs, args.batch_size)
            speed[name] = args.images / cached
            ratio[name] = streamed / cached
            print(
                f"{name:<16} epoch without cache / with cache: {streamed / cached:7.1f}x  "
                f"(filling the cache once: {filling / streamed:.2f} epochs' time)"
            )
        baseline = speed["linear"]
        for name, value in speed.items():
            print(f"{name:<16} training samples/s {value:9.1f}  ({value / baseline:.3f}x linear with cache)")
        print("README: epoch without cache / with cache (each after a warm-up epoch): "
              + ", ".join(f"{name} {value:.1f}x" for name, value in ratio.items()))  # fmt: skip


if __name__ == "__main__":
    main()
