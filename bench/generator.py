"""How often a toy text-to-image model draws exactly the shapes it is asked for, as the filter audit's judge sees it.

The judge is the audit's (a linear probe on the teacher's frozen features, per-label thresholds chosen on its
held-out quarter) trained on the world's ``judge`` stream, never on test scenes. Each model draws ``--per-set``
images for every label pair of the eight shapes (the template prompt, the experiment's 10 steps and the toy
preset's guidance 7.5); the same judge reads rendered two-shape scenes of the ``val`` stream as the ceiling of
what it can confirm, and the same scenes encoded and decoded by each model's VAE as the ceiling of what its latents
can hold.
``exact``: the judge sees the asked labels and no other; ``all asked``: every asked label, maybe more; ``extra``:
the mean number of shapes it sees that were not asked for.

Usage: python bench/generator.py --models toy-headroom,FOLDER [--per-set 2] [--clip toy-named] [--seed 0] [--steps 10]
       [--guidance 7.5]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch

from mlgen.classifiers.data import squash_transform
from mlgen.classifiers.evaluate import load_eval_set
from mlgen.classifiers.features import image_features
from mlgen.experiment.audit import JUDGE_IMAGES, fit_judge, judged_shares
from mlgen.generate.diffusion import encode_image, load_pipeline, render
from mlgen.models.registry import load_open_clip
from mlgen.prompts.composer import template_prompt
from mlgen.world.render import SHAPES, render_dataset, render_scene
from mlgen.world.streams import stream_rng


def real_pairs(pairs: list[tuple[str, str]], per_set: int, seed: int) -> tuple[list[bytes], list[tuple[str, ...]]]:
    """``per_set`` rendered headroom scenes holding exactly each pair (val stream): the judge's ceiling."""
    rng = stream_rng("val", seed + 7_919)
    images, asked = [], []
    for pair in pairs:
        found = 0
        while found < per_set:
            pixels, names, _ = render_scene(rng, labels=list(pair), world="headroom")
            if len(set(names)) == 2:
                images.append(encode_image(pixels, "png", 0))
                asked.append(pair)
                found += 1
    return images, asked


def vae_round_trip(pipe, images: list[bytes]) -> list[bytes]:
    """The images encoded and decoded by the pipeline's VAE: what its latents can hold at best."""
    import io

    from PIL import Image

    pixels = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))) for b in images])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
        decoded = pipe.vae.decode(latents).sample
    arrays = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [encode_image(array, "png", 0) for array in arrays]


def generated_pairs(
    pipe, pairs: list[tuple[str, str]], per_set: int, seed: int, steps: int, guidance: float
) -> list[bytes]:
    images = []
    for number, pair in enumerate(pairs):
        seeds = [seed * 1_000_003 + number * 1000 + i for i in range(per_set)]
        drawn = render(pipe, [template_prompt(pair)] * per_set, [""] * per_set, seeds, steps, 64, guidance)
        images += [encode_image(pixels, "png", 0) for pixels in drawn]
    return images


def shares(shows: np.ndarray, asked: list[tuple[str, ...]]) -> dict[str, float]:
    index = {shape: i for i, shape in enumerate(SHAPES)}
    mask = np.zeros_like(shows)
    for row, labels in enumerate(asked):
        mask[row, [index[label] for label in labels]] = True
    figures = judged_shares(mask, shows)
    return {"exact": figures["exact"], "all asked": figures["all_asked_shown"], "extra": (shows & ~mask).sum(1).mean()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toy-headroom")
    parser.add_argument("--per-set", type=int, default=2)
    parser.add_argument("--clip", default="toy-named", help="the teacher whose features the judge reads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (the experiment's 10)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (the toy preset's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = list(SHAPES)
    pairs = list(itertools.combinations(shapes, 2))
    model, preprocess, _ = load_open_clip(args.clip, torch.device("cpu"))
    encode = squash_transform(preprocess)

    def features(images: list[bytes]) -> torch.Tensor:
        return image_features(model, encode, images, torch.device("cpu"))

    with tempfile.TemporaryDirectory() as tmp:
        data = render_dataset(Path(tmp) / "judge", JUDGE_IMAGES, args.seed, shapes, world="headroom", stream="judge")
        images, targets, _ = load_eval_set(data / "labels.csv", shapes)
    judge = fit_judge(features(images), targets, list(range(len(shapes))), args.seed)
    real, asked = real_pairs(pairs, args.per_set, args.seed)
    rows = {"rendered scenes (ceiling)": (real, asked)}
    for name in args.models.split(","):
        pipe = load_pipeline(name, torch.device("cpu"), "auto")  # once per model: its VAE and its drawings
        rows[f"rendered scenes through {name}'s VAE"] = (vae_round_trip(pipe, real), asked)
        rows[name] = (generated_pairs(pipe, pairs, args.per_set, args.seed, args.steps, args.guidance), asked)
    print(f"{len(pairs)} pairs x {args.per_set} images, judge on {args.clip} features (lr {judge.tuning['lr']:g})")
    print("| images | exact | all asked | extra shapes |\n|---|---|---|---|")
    for name, (row_images, row_asked) in rows.items():
        figures = shares(judge.shows(judge(features(row_images))), row_asked)
        print(f"| {name} | {figures['exact']:.2f} | {figures['all asked']:.2f} | {figures['extra']:.2f} |")


if __name__ == "__main__":
    main()
