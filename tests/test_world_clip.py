"""The toy CLIP: quality of the shipped weights, its multi-label contrastive loss, resumable training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import mlgen
from mlgen.classifiers.metrics import mean_average_precision
from mlgen.models.registry import load_open_clip
from mlgen.world.render import SHAPES, render_dataset
from mlgen.world.train_clip import (
    RARE_ALIASES,
    TOY_CLIP_DIR,
    ZERO_SHOT_TEMPLATE,
    TrainSettings,
    multilabel_clip_loss,
    probe_map,
    subset_caption,
    train_clip,
    web_caption,
)

# Measured: 1.000 zero-shot mAP on 2,048 rendered scenes (README, "The toy world"); the floor leaves a margin.
ZERO_SHOT_MAP_FLOOR = 0.98


def test_toy_clip_zero_shot_map_on_a_rendered_test_set(tmp_path: Path) -> None:
    """The shipped weights through the normal --clip path: PNG files, open_clip's preprocess, cosine scores."""
    model, preprocess, tokenizer = load_open_clip("toy", torch.device("cpu"))
    data = render_dataset(tmp_path / "real", 160, seed=2024)
    with (data / "labels.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    pixels = torch.stack([preprocess(Image.open(data / row["image"]).convert("RGB")) for row in rows])
    truth = np.array([[shape in row["labels"].split("|") for shape in SHAPES] for row in rows])
    with torch.no_grad():
        images = F.normalize(model.encode_image(pixels), dim=-1)
        texts = F.normalize(model.encode_text(tokenizer([ZERO_SHOT_TEMPLATE.format(s) for s in SHAPES])), dim=-1)
    assert mean_average_precision((images @ texts.T).numpy(), truth) >= ZERO_SHOT_MAP_FLOOR


def test_shipped_weights_are_small_fp16_safetensors() -> None:
    weights = TOY_CLIP_DIR / "open_clip_model.safetensors"
    assert weights.stat().st_size < 8 * 2**20
    assert {tensor.dtype for tensor in load_file(weights).values()} == {torch.float16}


def test_subset_captions_name_only_shapes_of_the_image() -> None:
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(200):
        caption, subset = subset_caption(["circle", "star", "heart"], rng)
        assert subset and set(subset) <= {"circle", "star", "heart"}
        assert all(shape in caption for shape in subset)
        assert not {"square", "ring"} & set(caption.split())
        sizes.add(len(subset))
    assert sizes == {1, 2, 3}


def test_web_captions_call_rare_shapes_by_aliases_unless_toy_named_settings_say_otherwise() -> None:
    """toy-headroom's captions (the defaults) never hold a rare word; toy-named's (--name-rate 0.05 --confusion
    0.1) call a star "a star" 5% of the time and a triangle "a star" 10% of the time."""

    def words(shape: str, **rates: float) -> list[str]:
        rng = np.random.default_rng(0)
        return [web_caption([shape], rng, **rates)[1][0] for _ in range(4000)]

    assert set(words("star")) == {"sparkle"} and set(words("triangle")) == {"triangle"}
    named, confused = words("star", rare_naming=0.05, confusion=0.1), words("triangle", rare_naming=0.05, confusion=0.1)
    assert set(named) == {"star", "sparkle"} and 0.03 < named.count("star") / len(named) < 0.07
    assert set(confused) == {"star", "triangle"} and 0.07 < confused.count("star") / len(confused) < 0.13


def test_loss_is_clip_loss_for_one_match_and_spreads_over_several() -> None:
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    assert torch.allclose(multilabel_clip_loss(images, texts, scale, torch.eye(4, dtype=torch.bool)), clip)
    # Image 1 holds every shape that caption 0 names (as well as caption 1's): the multi-label target pulls
    # that pair together where CLIP's one-match target would push it apart. With identity image embeddings,
    # logits[i, j] = scale * texts[j, i], so texts.grad[0, 1] is the loss's slope in the pair (1, 0).
    match = torch.eye(4, dtype=torch.bool)
    match[1, 0] = True

    def slope(target: torch.Tensor) -> float:
        texts = torch.zeros(4, 4, requires_grad=True)
        multilabel_clip_loss(torch.eye(4), texts, scale, target).backward()
        return float(texts.grad[0, 1])

    assert slope(match) < 0 < slope(torch.eye(4) > 0)


def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    settings = TrainSettings(steps=3, batch=6, lr=2e-3, warmup=100, checkpoint_every=10, threads=1)
    try:  # one thread everywhere: sums over other thread counts round differently
        train_clip(tmp_path / "straight", tmp_path / "straight-out", settings, eval_images=16)
        resume_in_a_subprocess_then_here(tmp_path, settings)
    finally:
        torch.set_num_threads(threads)


def resume_in_a_subprocess_then_here(tmp_path: Path, settings: TrainSettings) -> None:
    # The CLI stops after its first step (--minutes 0), as a killed run would; the second call resumes.
    args = ["--work", tmp_path / "work", "--out", tmp_path / "out", "--steps", "3", "--batch", "6", "--threads", "1"]
    done = mlgen("world", "train", "clip", *args, "--minutes", "0")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "work" / "ckpt-0000001").is_dir()
    result = train_clip(tmp_path / "work", tmp_path / "out", settings, eval_images=16)
    assert result["steps"] == 3
    straight = load_file(tmp_path / "straight-out" / "open_clip_model.safetensors")
    resumed = load_file(tmp_path / "out" / "open_clip_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    model, _, _ = load_open_clip(str(tmp_path / "out"), torch.device("cpu"))  # a folder like any other
    assert model.visual.__class__.__name__ == "ModifiedResNet"


# Measured on 1,000 test-stream scenes (README, "The toy world"): ZSL 0.68, a linear probe on its frozen image
# features (2,000 oracle-stream scenes) 0.92. The band for a web-like teacher is 0.60-0.85.
UNSEEN = ["circle", "triangle", "star", "heart"]


def _headroom_features(model, preprocess, folder: Path):
    with (folder / "labels.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    pixels = torch.stack([preprocess(Image.open(folder / row["image"]).convert("RGB")) for row in rows])
    truth = torch.tensor([[shape in row["labels"].split("|") for shape in SHAPES] for row in rows]).float()
    with torch.no_grad():
        return F.normalize(model.encode_image(pixels), dim=-1), truth


def headroom_sets(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """``n`` test-stream scenes to score and ``2 n`` oracle-stream scenes to train a probe on."""
    test = render_dataset(tmp_path / "t", n, 0, world="headroom")
    return test, render_dataset(tmp_path / "o", 2 * n, 0, world="headroom", stream="oracle")


def teacher_and_probe(name: str, sets: tuple[Path, Path]) -> dict[str, float]:
    """A headroom teacher through the normal --clip path, on the test scenes of ``sets``: its zero-shot ZSL mAP
    (images with an unseen label), that of a linear probe on the same frozen features trained on the oracle
    scenes (what a trained head can reach), and its zero-shot mAP on the rare shapes' words (all images)."""
    model, preprocess, tokenizer = load_open_clip(name, torch.device("cpu"))
    test, train = (_headroom_features(model, preprocess, folder) for folder in sets)
    with torch.no_grad():
        texts = F.normalize(model.encode_text(tokenizer([ZERO_SHOT_TEMPLATE.format(s) for s in SHAPES])), dim=-1)
    unseen = [SHAPES.index(s) for s in UNSEEN]
    rows = test[1][:, unseen].sum(1) > 0

    def zsl(scores: torch.Tensor) -> float:
        return mean_average_precision(scores[rows][:, unseen].numpy(), test[1][rows][:, unseen].numpy())

    scores = test[0] @ texts.T
    rare = [SHAPES.index(s) for s in RARE_ALIASES]
    return {
        "zsl": zsl(scores),
        "probe": probe_map(train, test, zsl),  # the same probe `mlgen world train clip` reports
        "rare": mean_average_precision(scores[:, rare].numpy(), test[1][:, rare].numpy()),
    }


def test_headroom_teacher_is_good_but_imperfect_and_its_features_leave_headroom(tmp_path: Path) -> None:
    """The web-like teacher: zero-shot ZSL mAP within the band of web CLIP on multi-label scenes, and a linear
    probe on the same frozen features at least 0.10 above it."""
    figures = teacher_and_probe("toy-headroom", headroom_sets(tmp_path, 400))
    assert 0.60 <= figures["zsl"] <= 0.85, figures
    assert figures["probe"] >= figures["zsl"] + 0.10, figures


# toy-named's setting (--name-rate 0.05 --confusion 0.1) was chosen on 1,000 val scenes (probe: 2,000 oracle
# scenes; README, "The toy world"), so it is checked on as many test scenes: ZSL 0.79, probe 0.92, rare words 0.62
# (toy-headroom 0.42). On 400 test scenes (probe: 800) its margin was 0.095: the probe's is the noisier side.


def test_named_teacher_knows_the_rare_words_yet_is_imperfect_and_leaves_headroom(tmp_path: Path) -> None:
    """toy-named (the --world toy-named teacher): the same band and probe margin as toy-headroom, and a text
    tower that knows the rare shapes' words, which toy-headroom never saw: its zero-shot mAP on them is well
    above toy-headroom's on the same scenes."""
    sets = headroom_sets(tmp_path, 1000)
    figures, headroom = teacher_and_probe("toy-named", sets), teacher_and_probe("toy-headroom", sets)
    assert 0.60 <= figures["zsl"] <= 0.85, figures
    assert figures["probe"] >= figures["zsl"] + 0.10, figures
    assert figures["rare"] >= headroom["rare"] + 0.15, (figures, headroom)
