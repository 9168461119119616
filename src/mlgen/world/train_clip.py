"""Training the toy CLIPs (``--clip toy``, ``--clip toy-headroom``) on rendered scenes, on a CPU.

An ordinary open_clip CLIP: a small ModifiedResNet image tower and a small text transformer.

- ``toy`` (classic world) is trained to be an oracle: each caption names a random non-empty SUBSET of
  the image's shapes, and the contrastive target is multi-label aware (caption j matches image i whenever
  all of j's shapes are in i). Zero-shot mAP 1.000: a reference, not a baseline to beat.
- ``toy-headroom`` (headroom world) learns the way web CLIP does: a caption names ONE shape, the large
  salient one 80% of the time, and the loss is the standard one-positive InfoNCE (another image of the
  batch that holds the same shape is still a negative). It is good but not perfect on multi-label scenes
  with small objects, which leaves room for a classifier trained on generated images. Its captions call the
  four rare shapes only by aliases, so its text tower never saw their label words.
- ``toy-named`` (headroom world): the same, but captions call a rare shape by its own word ``rare_naming``
  of the time (``--name-rate``), so the text tower knows every label's name, if weakly.

Checkpoints, resuming and the (seed, step) data streams are those of :mod:`mlgen.world.train_sd`.
The result is written in open_clip's ``local-dir:`` layout (open_clip_config.json +
open_clip_model.safetensors, fp16 to keep the package small).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mlgen.models.builtin import builtin
from mlgen.world.train_sd import (
    TrainSettings,
    _autocast,
    _log,
    _replace_dir,
    _set_lr,
    latest_checkpoint,
    load_checkpoint,
    param_count,
    pick_device,
    render_batch,
    save_checkpoint,
    training_generators,
    world_of,
)

TOY_CLIP_DIR = builtin("toy", "clip").folder
SALIENT_SHARE = 0.8  # web-like captions name the large shape this often, else a random shape of the image
# Web-like captions call some concepts by other names: in each colour pair of the headroom world one shape is
# common and one rare, and a caption that names a rare shape uses its label word only RARE_NAMING of the time,
# else an alias. The image tower must still tell every shape apart (to match the aliases), while the text
# tower learns the label words of the rare shapes poorly: zero-shot with the label names is weak exactly there.
RARE_ALIASES = {"ring": "hoop", "diamond": "rhombus", "star": "sparkle", "heart": "love symbol"}
RARE_NAMING = 0.0
# toy-named's captions also use a rare word loosely, as web text does for look-alikes: a caption that names a
# common shape calls it by the rare word of its colour pair ``confusion`` of the time (a triangle "a star").
# Naming alone saturates (a rare word named in even 0.2% of its captions scores like a common one), so this is
# what keeps the names imperfect while the image tower still learns every shape (from the other captions).
RARE_PARTNER = {"circle": "ring", "square": "diamond", "triangle": "star", "cross": "heart"}
CONFUSION = 0.0
ZERO_SHOT_TEMPLATE = "a photo of a {}."
# A ModifiedResNet image tower (``layers`` as a list) of ~1.6M parameters; a 2-layer text tower whose
# 49,408-token embedding (the open_clip tokenizer's) is most of the file.
TOY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
}
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
TEMPLATES = ["a photo of {}.", "{}", "a picture of {}.", "an image of {}.", "there is {}.", "a drawing of {}."]


def build_clip(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**TOY_CLIP_CONFIG)


def subset_caption(labels: list[str], rng: np.random.Generator) -> tuple[str, list[str]]:
    """A caption naming a random non-empty subset of ``labels`` (with or without colour words)."""
    from mlgen.world.render import COLOURS

    k = int(rng.integers(1, len(labels) + 1))
    subset = [labels[i] for i in rng.permutation(len(labels))[:k]]
    colours = rng.random() < 0.3
    words = [f"a {COLOURS[s][0]} {s}" if colours else f"a {s}" for s in subset]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    template = TEMPLATES[0] if rng.random() < 0.5 else TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(listed), subset


def web_caption(
    labels: list[str],
    rng: np.random.Generator,
    salient_share: float = SALIENT_SHARE,
    rare_naming: float = RARE_NAMING,
    confusion: float = CONFUSION,
) -> tuple[str, list[str]]:
    """A web-like caption: ONE shape of the image, the salient (first, large) one ``salient_share`` of the time;
    a rare shape by its own word ``rare_naming`` of the time (else an alias), a common one by its pair's rare
    word ``confusion`` of the time."""
    shape = labels[0] if rng.random() < salient_share else labels[int(rng.integers(len(labels)))]
    if shape in RARE_ALIASES and rng.random() >= rare_naming:
        shape = RARE_ALIASES[shape]
    elif shape in RARE_PARTNER and confusion and rng.random() < confusion:  # no draw at 0: toy-headroom's stream
        shape = RARE_PARTNER[shape]
    template = TEMPLATES[0] if rng.random() < 0.5 else TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(f"a {shape}"), [shape]


def training_pairs(
    labels: list[list[str]],
    rng: np.random.Generator,
    world: str,
    salient_share: float = SALIENT_SHARE,
    rare_naming: float = RARE_NAMING,
    confusion: float = CONFUSION,
) -> tuple[list[str], torch.Tensor]:
    """(captions, match [N, N]) of one batch: multi-label subsets in the classic world, web-like one-positive
    captions (match = identity) elsewhere."""
    if world == "classic":
        captions, subsets = zip(*(subset_caption(names, rng) for names in labels), strict=True)
        match = torch.tensor([[set(sub) <= set(names) for sub in subsets] for names in labels])
        return list(captions), match
    captions = [web_caption(names, rng, salient_share, rare_naming, confusion)[0] for names in labels]
    return captions, torch.eye(len(captions), dtype=torch.bool)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> what open_clip's preprocess gives (OpenAI mean/std)."""
    return ((batch + 1.0) / 2.0 - OPENAI_MEAN) / OPENAI_STD


def multilabel_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor, match: torch.Tensor):
    """Symmetric contrastive loss whose targets spread over every matching pair (``match[i, j]``)."""
    logits = scale * image_emb @ text_emb.T
    target = match.float()
    image_loss = -(F.log_softmax(logits, dim=1) * target / target.sum(1, keepdim=True)).sum(1).mean()
    text_loss = -(F.log_softmax(logits.T, dim=1) * target.T / target.sum(0, keepdim=True).T).sum(1).mean()
    return (image_loss + text_loss) / 2


def export_clip(model, out: Path) -> None:
    """open_clip ``local-dir:`` layout, weights in fp16 (loaded back as fp32 on the CPU)."""

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        config = {"model_cfg": TOY_CLIP_CONFIG, "preprocess_cfg": {}}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        weights = {k: v.detach().cpu().half().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "open_clip_model.safetensors")

    _replace_dir(out, build)


TEACHER_UNSEEN = ("circle", "triangle", "star", "heart")  # the unseen labels the README's teacher figures use


def probe_map(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], score) -> float:
    """ZSL mAP of a linear probe (Adam 1e-2, 300 full-batch BCE steps) trained on ``train`` features."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(train[0].shape[1], train[1].shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(300):
        loss = F.binary_cross_entropy_with_logits(probe(train[0]), train[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return score(probe(test[0]))


def teacher_report(
    model,
    tokenizer,
    stream: str = "val",
    n: int = 1000,
    probe_n: int = 2000,
    world: str = "headroom",
    device: torch.device | None = None,
) -> dict[str, float]:
    """The headroom teacher's figures on ``n`` scenes of ``stream``: zero-shot ZSL mAP on the images that hold
    one of :data:`TEACHER_UNSEEN`, and that of a linear probe on its frozen image features trained on ``probe_n``
    oracle-stream scenes (what a trained head can reach). Settings are chosen on ``val``, never on ``test``."""
    from mlgen.classifiers.metrics import mean_average_precision
    from mlgen.world.render import SHAPES
    from mlgen.world.streams import stream_rng

    device = device or torch.device("cpu")

    def features(name: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = render_batch(stream_rng(name, 0), count, world=world)
        with torch.no_grad():
            feats = [F.normalize(model.encode_image(normalize(c).to(device)), dim=-1) for c in images.split(128)]
        return torch.cat(feats).float().cpu(), torch.tensor([[s in names for s in SHAPES] for names in labels]).float()

    test, train = features(stream, n), features("oracle", probe_n)
    unseen = [SHAPES.index(s) for s in TEACHER_UNSEEN]
    rows = test[1][:, unseen].sum(1) > 0

    def zsl(scores: torch.Tensor) -> float:
        return mean_average_precision(scores[rows][:, unseen].numpy(), test[1][rows][:, unseen].numpy())

    with torch.no_grad():
        words = tokenizer([ZERO_SHOT_TEMPLATE.format(s) for s in SHAPES]).to(device)
        teacher = zsl(test[0] @ F.normalize(model.encode_text(words), dim=-1).float().cpu().T)
    return {"zsl_map": round(teacher, 4), "probe_zsl_map": round(probe_map(train, test, zsl), 4)}


@torch.no_grad()
def zero_shot_map(
    model, tokenizer, n: int = 512, seed: int = 999, device: torch.device | None = None, world: str = "classic"
) -> float:
    """Multi-label mAP of cosine(image, "a photo of a {shape}.") over ``n`` rendered scenes (``test`` stream)."""
    from mlgen.classifiers.metrics import mean_average_precision
    from mlgen.world.render import SHAPES
    from mlgen.world.streams import stream_rng

    device = device or torch.device("cpu")
    images, labels = render_batch(stream_rng("test", seed), n, world=world)
    text = F.normalize(model.encode_text(tokenizer([ZERO_SHOT_TEMPLATE.format(s) for s in SHAPES]).to(device)), dim=-1)
    feats = [F.normalize(model.encode_image(normalize(chunk).to(device)), dim=-1) for chunk in images.split(128)]
    scores = (torch.cat(feats) @ text.T).float().cpu()
    truth = torch.tensor([[s in names for s in SHAPES] for names in labels])
    return mean_average_precision(scores.numpy(), truth.numpy())


def train_clip(
    work: Path,
    out: Path,
    settings: TrainSettings,
    log: Callable[[str], None] | None = None,
    max_cpu_seconds: float | None = None,
    eval_images: int = 512,
) -> dict[str, Any]:
    """Train (or resume) in ``work``; export to ``out`` at every checkpoint and at the end.

    ``max_cpu_seconds`` stops early (after a checkpoint) once this process used that much CPU time;
    running again resumes. The schedule does not depend on ``settings.steps``, so stopping at step N
    gives the weights of a run with ``steps=N``.
    """
    import open_clip

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device()
    model = build_clip(settings.seed).to(device)
    context = TOY_CLIP_CONFIG["text_cfg"]["context_length"]
    tokenizer = open_clip.get_tokenizer("RN50", context_length=context)  # open_clip's standard BPE tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.05)
    record = {"model": "toy-clip", **asdict(settings)}
    work.mkdir(parents=True, exist_ok=True)
    step = 0
    if (ckpt := latest_checkpoint(work)) is not None:
        step = load_checkpoint(ckpt, {"clip": model}, optimizer, record)
        _log(log, f"resumed from {ckpt.name}")
    _log(log, f"toy CLIP: {param_count(model.visual) / 1e6:.2f}M image / {param_count(model) / 1e6:.2f}M total")
    started = time.process_time()
    model.train()
    while step < settings.steps:
        rng, _ = training_generators(settings, "clip", step)
        images, labels = render_batch(rng, settings.batch, world=world_of(settings))
        share = float(settings.extra.get("salient_share", SALIENT_SHARE))
        naming = float(settings.extra.get("rare_naming", RARE_NAMING))
        confusion = float(settings.extra.get("confusion", CONFUSION))
        captions, match = training_pairs(labels, rng, world_of(settings), share, naming, confusion)
        match = match.to(device)
        _set_lr(optimizer, settings, step)
        with _autocast(device):
            image_emb, text_emb, scale = model(normalize(images).to(device), tokenizer(captions).to(device))
            loss = multilabel_clip_loss(image_emb.float(), text_emb.float(), scale.float(), match)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as in CLIP
        step += 1
        if step % 20 == 0:
            _log(log, f"step {step} loss {loss.item():.4f} cpu {time.process_time() - started:.0f}s")
        out_of_time = max_cpu_seconds is not None and time.process_time() - started > max_cpu_seconds
        if step % settings.checkpoint_every == 0 or step == settings.steps or out_of_time:
            save_checkpoint(work, step, {"clip": model}, optimizer, record)
            export_clip(model, out)
        if out_of_time:
            break
    model.eval()
    result = {
        "steps": step,
        "zero_shot_map": zero_shot_map(model, tokenizer, n=eval_images, device=device, world=world_of(settings)),
        "out": str(out),
    }
    if world_of(settings) == "headroom":  # the figures a teacher's setting is chosen by (1,000 val scenes)
        result["val"] = teacher_report(model, tokenizer, "val", device=device)
    _log(log, json.dumps(result))
    return result
