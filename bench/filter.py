"""Filter speed, as ratios against baselines measured in the same run (absolute times are noise here).

1. overhead: the filter stage's images/s (reading tars, decoding in DataLoader workers, CLIP,
   grouping softmax, the run's reliability and decisions, writing shards and the embedding cache; model
   load excluded) over
   bare open_clip ``encode_image`` on the same images, decoded and batched beforehand: goal 0.9 or better;
2. batching alone: the stage with inline decoding (``workers=0``) over a one-image-at-a-time loop
   (decode, preprocess, encode, grouping softmax, exact-set rule per image, as the filter did
   before), both decoding in the main process: goal 5x or more;
   the workers' gain: the stage with ``--workers N`` decoding processes over the same stage inline;
3. rescore: ``--rescore`` (another threshold, cached embeddings, no image encoder) wall time over
   a full filter run's wall time, both in this process with the model load: goal under 0.1.

The raw images are made once by the tiny diffusion model (not timed).

On a CPU with the tiny CLIP the stage is bound by JPEG decoding (the "decoding alone" line), which
the bare-encode baseline leaves out by definition. ``--clip random:ViT-B-32`` benchmarks the real
architecture with random weights (built offline), where the image encoder, not decoding, is the cost.

Usage: python bench/filter.py [--images 256] [--size 256] [--clip tiny|random:ARCH|NAME] [--batch-size 64]
       [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from mlgen.config import FilterConfig, GenerateConfig, PromptsConfig
from mlgen.filters import exact_set_keep, grouping_softmax, requested_mask
from mlgen.filters import stage as filter_stage
from mlgen.filters.loader import batches, decoded_batches, pixels_of
from mlgen.models.registry import load_open_clip
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.stage import PromptStage
from mlgen.shards.reader import finished_shards, iter_shard
from mlgen.workflow import filter_images, generate

LABELS = ["zebra", "surfboard", "kite", "bench", "dog", "cat", "car", "tree"]  # 36 label sets x 5 prompts


def make_raw(run: RunDir, images: int, size: int) -> None:
    """A finished raw stage of ``images`` tiny-model images (one image per prompt)."""
    prompts = PromptsConfig(llm="template")
    run_stage(PromptStage(run, prompts, LABELS))
    path = run.stage_dir("prompts") / "prompts.parquet"
    table = pq.read_table(path)
    per_prompt = -(-images // table.num_rows)
    pq.write_table(table.slice(0, -(-images // per_prompt)), path)
    config = GenerateConfig(
        model="tiny", steps=1, size=size, shard_size=128, batch_size=16, images_per_prompt=per_prompt
    )
    generate(run, config, prompts)


def random_weights_clip(arch: str, folder: Path) -> str:
    """An open_clip ``arch`` with random weights in ``folder`` (local-dir layout): real compute, no download."""
    import open_clip

    from mlgen.models.tiny import build_random_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise SystemExit(f"unknown open_clip architecture {arch!r}")
    folder.mkdir(parents=True)
    build_random_clip(folder, config)
    return str(folder)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


LOADS: list[float] = []  # seconds of each CLIP load the filter stage made


def timed_load(*args, **kwargs):
    started = time.perf_counter()
    loaded = load_open_clip(*args, **kwargs)
    LOADS.append(time.perf_counter() - started)
    return loaded


def stage_seconds(run: RunDir, config: FilterConfig) -> tuple[float, float]:
    """(seconds without the model load, wall seconds with it) of a full filter run, no cache.

    The stage embeds every shard first and decides the whole run after, so its time is the wall time less
    the CLIP loads it made (timed by wrapping the stage's loader).
    """
    shutil.rmtree(run.root / "cache", ignore_errors=True)
    shutil.rmtree(run.stage_dir("filtered"), ignore_errors=True)  # same settings: the runner would skip it
    LOADS.clear()
    started = time.perf_counter()
    filter_images(run, config, overwrite=True)
    wall = time.perf_counter() - started
    return wall - sum(LOADS), wall


def decoded(run: RunDir, preprocess, batch_size: int, workers: int = 0) -> list[torch.Tensor]:
    raw = run.stage_dir("raw")
    return [p for s in finished_shards(raw) for _, p in decoded_batches(raw, s, batch_size, preprocess, workers)]


def decode_seconds(run: RunDir, preprocess, batch_size: int, workers: int) -> float:
    """Reading and decoding alone, as the stage's DataLoader does it: the stage cannot beat this rate."""
    started = time.perf_counter()
    decoded(run, preprocess, batch_size, workers)
    return time.perf_counter() - started


def bare_seconds(model, pixels: list[torch.Tensor]) -> float:
    """Bare ``encode_image`` over already decoded batches (moved to the device inside the timing)."""
    dtype = model.logit_scale.dtype
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in pixels:
            torch.nn.functional.normalize(model.encode_image(batch.to(device(), dtype)).float(), dim=-1).cpu()
    sync()
    return time.perf_counter() - started


def one_at_a_time_seconds(run: RunDir, model, preprocess, tokenizer) -> float:
    """The per-image loop: decode, preprocess, encode and decide one image at a time."""
    classes = run.classes()
    index = {label: i for i, label in enumerate(classes)}
    dtype = model.logit_scale.dtype
    raw = run.stage_dir("raw")
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(classes).to(device())).float(), dim=-1)
        for shard in finished_shards(raw):
            for [sample] in batches(iter_shard(raw, shard), 1):
                pixels = pixels_of([sample], preprocess).to(device(), dtype)
                feature = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
                logits = model.logit_scale.exp().float() * feature @ text.T
                wanted = [index[label] for label in json.loads(sample["json"])["labels"]]
                requested = requested_mask([wanted], len(classes), logits.device)
                bool(exact_set_keep(grouping_softmax(logits, requested), requested)[0])
    sync()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="size of the generated (raw) images")
    parser.add_argument("--clip", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    filter_stage.load_open_clip = timed_load  # the stage's loads are timed, to be left out of its time
    with tempfile.TemporaryDirectory() as tmp:
        if args.clip.startswith("random:"):
            args.clip = random_weights_clip(args.clip.removeprefix("random:"), Path(tmp) / "clip")
        config = FilterConfig(clip=args.clip, batch_size=args.batch_size, workers=args.workers)
        run = RunDir(Path(tmp) / "run")
        make_raw(run, args.images, args.size)
        images = sum(1 for s in finished_shards(run.stage_dir("raw")) for _ in iter_shard(run.stage_dir("raw"), s))
        model, preprocess, tokenizer = load_open_clip(args.clip, device())
        pixels = decoded(run, preprocess, args.batch_size)
        bare_seconds(model, pixels[:2])  # warm-up: kernels, caches
        inline_config = FilterConfig(clip=args.clip, batch_size=args.batch_size, workers=0)
        # Best of three, alternating, so that neither variant profits from running later.
        stage, full, bare, inline = float("inf"), float("inf"), float("inf"), float("inf")
        for _ in range(3):
            shards, wall = stage_seconds(run, config)
            stage, full = min(stage, shards), min(full, wall)
            inline = min(inline, stage_seconds(run, inline_config)[0])
            bare = min(bare, bare_seconds(model, pixels))
        decoding = min(decode_seconds(run, preprocess, args.batch_size, args.workers) for _ in range(2))
        single = one_at_a_time_seconds(run, model, preprocess, tokenizer)
        rescore, rescore_shards = float("inf"), float("inf")
        for threshold in (0.4, 0.3, 0.2):
            LOADS.clear()
            started = time.perf_counter()
            filter_images(run, FilterConfig(clip=args.clip, threshold=threshold), rescore=True)
            rescore = min(rescore, time.perf_counter() - started)
            rescore_shards = min(rescore_shards, rescore - sum(LOADS))
    print(f"{images} images of {args.size} px, CLIP {args.clip} on {device()}, batch {args.batch_size}, "
          f"{args.workers} decoding workers")  # fmt: skip
    print(f"filter stage        : {images / stage:8.1f} images/s  ({args.workers} decoding workers)")
    print(f"stage, inline decode: {images / inline:8.1f} images/s  (workers=0)")
    print(f"bare encode_image   : {images / bare:8.1f} images/s")
    print(f"one image at a time : {images / single:8.1f} images/s  (inline decoding)")
    print(f"decoding alone      : {images / decoding:8.1f} images/s  (read + decode + preprocess, the stage's bound)")
    print(f"stage / bare encode_image images/s: {bare / stage:.3f}  (goal >= 0.9)")
    print(f"batching alone (both inline)     : {single / inline:.2f}x  (goal >= 5)")
    print(f"workers' gain ({args.workers} vs inline)       : {inline / stage:.2f}x")
    print(f"rescore / full filter wall time  : {rescore / full:.3f}  ({rescore:.2f} s / {full:.2f} s; goal < 0.1)")
    print(f"rescore / full, shards only      : {rescore_shards / stage:.3f}  (model load excluded)")
    print(f"README: stage {bare / stage:.2f} of bare encode_image ({images / stage:.1f} vs {images / bare:.1f} "
          f"images/s), batching alone {single / inline:.2f}x the one-image loop, {args.workers} workers "
          f"{inline / stage:.2f}x inline decoding, rescore {rescore / full:.3f} of a full run")  # fmt: skip


if __name__ == "__main__":
    main()
