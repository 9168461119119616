"""Training the toy text-to-image model (``--model toy``) on rendered scenes, on a CPU.

Two runs, each seeded and resumable: ``train_vae`` (a tiny AutoencoderKL, 64 px to a 16x16x4
latent), then ``train_unet`` (a tiny UNet2DConditionModel trained jointly with a tiny CLIP text
encoder whose tokenizer keeps only the words of this world and of everyday prompts). Every
checkpoint is a folder renamed into place (weights in safetensors, optimizer state readable with
``torch.load(weights_only=True)``); a killed run resumes from the newest one and ends with the same
weights as an uninterrupted run, because each step draws its data and noise from (seed, step)
alone. ``train_unet`` exports a normal diffusers ``StableDiffusionPipeline`` folder.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mlgen.errors import MlgenError
from mlgen.models.builtin import builtin
from mlgen.models.quiet import quiet_libraries
from mlgen.paths import write_json_atomic

quiet_libraries()  # no weight-loading bars or info logs in mlgen's output

TOY_SD_DIR = builtin("toy", "diffusion").folder
SIZE = 64
NUM_TRAIN_TIMESTEPS = 1000
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # SD's schedule

# --- captions and the pruned vocabulary ----------------------------------------------------------

COLOUR_WORDS = "red green blue yellow orange purple pink brown black white gray grey cyan magenta golden silver"
COUNT_WORDS = "a an one two three single pair of some several few many"
RELATIONS = [
    "and",
    "with",
    "next to",
    "beside",
    "near",
    "above",
    "below",
    "behind",
    "in front of",
    "on the left of",
    "on the right of",
    "and also",
]
PREFIXES = [
    "a photo of",
    "a picture of",
    "an image of",
    "a drawing of",
    "a painting of",
    "a close up photo of",
    "a simple illustration of",
    "there is",
    "there are",
    "this is",
    "we can see",
    "a scene with",
]
SUFFIXES = [
    "on a wooden table",
    "on the table",
    "on the floor",
    "in a park",
    "in the room",
    "on the grass",
    "in the sky",
    "on a white background",
    "on a dark background",
    "in the garden",
    "on the street",
    "at night",
    "in the sun",
    "on a sunny day",
    "in a kitchen",
    "on the wall",
    "high quality",
    "realistic",
    "very detailed",
]
ADJECTIVES = "big small large little tiny bright dark shiny simple beautiful old new round flat colorful plastic metal"
FILLER_WORDS = (
    "the is are of in on at to it this that there here its their very together close far "
    "left right top bottom middle center side corner front back background scene picture photo image "
    "table floor wall room park grass sky garden street kitchen water light day night sun "
    "wooden paper toy object objects shape shapes thing things standing sitting lying placed "
    "showing shown looking view"
)


def world_shapes() -> list[str]:
    from mlgen.world.render import SHAPES

    return list(SHAPES)


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def vocabulary_words(shapes: list[str]) -> list[str]:
    """Every word the pruned tokenizer keeps: the shapes (and plurals) and everyday prompt words."""
    text = " ".join(
        [COLOUR_WORDS, COUNT_WORDS, ADJECTIVES, FILLER_WORDS, *RELATIONS, *PREFIXES, *SUFFIXES]
        + shapes
        + [plural(s) for s in shapes]
    )
    return sorted(set(text.split()))


def pruned_tokenizer(words: list[str]):
    """A CLIPTokenizer whose vocabulary holds ``words`` plus what CLIP's BPE needs to build them.

    For each word the merges CLIP's full BPE applies are kept, in their original order, so a kept
    word becomes exactly the tokens it becomes in CLIP. Other words break into letter pieces (which
    the training captions teach the encoder to ignore), and characters no kept word uses fall to
    ``<|unk|>``.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    ranks = SimpleTokenizer().bpe_ranks
    merges: set[tuple[str, str]] = set()
    pieces: set[str] = set()
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        pieces.update(parts)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in itertools.pairwise(parts) if (a, b) in ranks}
            if not pairs:
                break
            first, second = min(pairs, key=ranks.__getitem__)
            merges.add((first, second))
            pieces.add(first + second)
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence, as CLIP's BPE does
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(pieces))}
    ordered = sorted(merges, key=ranks.__getitem__)
    return CLIPTokenizer(
        vocab=vocab, merges=ordered, model_max_length=77, pad_token="<|endoftext|>", unk_token="<|unk|>"
    )


def _pseudo_word(rng: np.random.Generator) -> str:
    """A random letter string: stands for every word an LLM may write that the vocabulary lacks."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return "".join(rng.choice(letters, size=int(rng.integers(3, 9))))


def random_caption(labels: list[str], rng: np.random.Generator) -> str:
    """A caption that names exactly ``labels`` amid random filler, colours and unknown words.

    The filler varies freely while the shape words alone predict the image, so the text encoder
    learns to read the shape names out of LLM-written prompts and to ignore the rest (colour words
    included: each class has its own colour, whatever the prompt says).
    """
    order = [labels[i] for i in rng.permutation(len(labels))]
    phrases = []
    for shape in order:
        words = []
        if rng.random() < 0.7:
            words.append(str(rng.choice(["a", "a", "the", "one", "an"])))
        for _ in range(int(rng.integers(0, 3))):
            words.append(str(rng.choice((ADJECTIVES + " " + COLOUR_WORDS + " " + COLOUR_WORDS).split())))
        words.append(plural(shape) if rng.random() < 0.15 else shape)
        phrases.append(" ".join(words))
    caption = phrases[0]
    for phrase in phrases[1:]:
        caption += (", " if rng.random() < 0.2 else f" {rng.choice(RELATIONS)} ") + phrase
    if rng.random() < 0.5:
        caption = f"{rng.choice(PREFIXES)} {caption}"
    if rng.random() < 0.5:
        caption = f"{caption} {rng.choice(SUFFIXES)}"
    words = caption.split()
    for _ in range(int(rng.poisson(1.0))):  # stray words, known and unknown, anywhere
        extra = _pseudo_word(rng) if rng.random() < 0.5 else str(rng.choice(FILLER_WORDS.split()))
        words.insert(int(rng.integers(0, len(words) + 1)), extra)
    caption = " ".join(words)
    return caption[0].upper() + caption[1:] + ("." if rng.random() < 0.5 else "")


# --- models ---------------------------------------------------------------------------------------


def build_vae():
    """Three blocks: 64 px -> 16x16x4 latents (the pipeline's VAE scale is 2**(blocks-1) = 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = CLIPTextModel(config)
    # CLIP's init (std 0.02) leaves the output nearly the same for every prompt (mean |difference|
    # 0.016 at unit scale, still after 300 steps), so the UNet had nothing to follow: token
    # embeddings at unit scale make the words the largest signal from the first step.
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    return model


UNET_CHANNELS = (32, 64, 64)  # 1.5M parameters: 6 MB in fp32, ~0.8 s per step of 32 on one core


def build_unet(channels: tuple[int, ...] = UNET_CHANNELS):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(channels) - 1),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
        # The text also enters as a pooled vector added to the timestep embedding: a global signal
        # (which colours, how many) that a UNet trained from scratch picks up far sooner than
        # cross-attention alone (which followed no prompt after 500 steps of 32 in a first run).
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- data -----------------------------------------------------------------------------------------


def step_generators(seed: int, step: int, stream: str | None = None) -> tuple[np.random.Generator, torch.Generator]:
    """The data and noise of one step depend on (seed, step) only: a resumed run redraws them exactly.

    ``stream`` names the random stream (:mod:`mlgen.world.streams`); None is the legacy ``[seed, step]``
    sequence that the shipped classic-world models were trained on (kept so they stay reproducible).
    """
    from mlgen.world.streams import stream_sequence

    sequence = np.random.SeedSequence([seed, step]) if stream is None else stream_sequence(stream, seed, step)
    torch_seed = int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    return np.random.default_rng(sequence), torch.Generator().manual_seed(torch_seed)


def world_of(settings: TrainSettings) -> str:
    """The toy world a training run draws (``settings.extra['world']``, default classic)."""
    return str(settings.extra.get("world", "classic"))


def training_generators(settings: TrainSettings, model: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Step ``step``'s generators for training ``model`` (clip, vae, unet): the legacy stream for the classic
    world's shipped models, the named ``train-MODEL`` stream for every other world."""
    stream = None if world_of(settings) == "classic" else f"train-{model}"
    return step_generators(settings.seed, step, stream)


def render_batch(
    rng: np.random.Generator, n: int, size: int = SIZE, world: str = "classic"
) -> tuple[torch.Tensor, list[list[str]]]:
    """``n`` rendered scenes as a [-1, 1] float tensor [n, 3, size, size] and their label lists."""
    from mlgen.world.render import render_scene

    images, labels = [], []
    for _ in range(n):
        pixels, names, _caption = render_scene(rng, size=size, world=world)
        images.append(torch.from_numpy(np.array(pixels, dtype=np.uint8)))  # a writable copy
        labels.append(list(dict.fromkeys(names)))  # a class drawn twice is still one label
    batch = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return batch, labels


# --- checkpoints ----------------------------------------------------------------------------------

CKPT_PREFIX = "ckpt-"


def save_checkpoint(work: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, settings: dict) -> Path:
    """Write ``work/ckpt-STEP/`` under a temporary name, rename it into place, drop older ones."""
    final = work / f"{CKPT_PREFIX}{step:07d}"
    tmp = work / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, m in modules.items()
        for key, value in m.state_dict().items()
    }
    save_file(weights, tmp / "weights.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state()}, tmp / "state.pt"
    )
    write_json_atomic(tmp / "settings.json", settings)
    os.replace(tmp, final)
    for old in work.glob(f"{CKPT_PREFIX}*"):
        if old != final and old.name < final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(work: Path) -> Path | None:
    """The newest finished checkpoint (temporary folders of a killed save are ignored)."""
    done = sorted(p for p in work.glob(f"{CKPT_PREFIX}*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, settings: dict) -> int:
    saved = json.loads((path / "settings.json").read_text(encoding="utf-8"))
    changed = sorted(
        k
        for k in settings
        if k not in ("steps", "checkpoint_every", "threads", "eval_images") and saved.get(k) != settings[k]
    )
    if changed:
        raise MlgenError(f"{path.parent} holds a run with other settings ({', '.join(changed)}): use another --work")
    weights = load_file(path / "weights.safetensors")
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def _replace_dir(final: Path, build: Callable[[Path], None]) -> None:
    """Build a folder beside ``final`` and swap it in (the old one stays whole until the swap)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --- training -------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    steps: int
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    warmup: int = 100
    checkpoint_every: int = 100
    threads: int = 0
    eval_images: int = 256  # renders for the VAE's latent scale and PSNR at the end
    extra: dict[str, Any] = field(default_factory=dict)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _set_lr(optimizer, settings: TrainSettings, step: int) -> None:
    scale = min(1.0, (step + 1) / settings.warmup)
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * scale


def _log(log: Callable[[str], None] | None, message: str) -> None:
    if log:
        log(message)


def psnr(vae, n: int = 64, seed: int = 12345, world: str = "classic") -> float:
    """Mean reconstruction PSNR (dB) of ``n`` fresh renders through the VAE (posterior mean)."""
    rng = np.random.default_rng(seed)
    device = vae.device
    values = []
    with torch.no_grad():
        for start in range(0, n, 32):
            images, _ = render_batch(rng, min(32, n - start), world=world)
            images = images.to(device)
            recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
            mse = ((recon - images) / 2).pow(2).flatten(1).mean(1)
            values.append(10 * torch.log10(1.0 / mse.clamp(min=1e-10)))
    return float(torch.cat(values).mean())


def latent_scale(vae, n: int = 256, seed: int = 54321, world: str = "classic") -> float:
    """1 / std of the latents, so the diffusion sees unit-variance latents (SD's scaling_factor)."""
    rng = np.random.default_rng(seed)
    images, _ = render_batch(rng, n, world=world)
    with torch.no_grad():
        latents = vae.encode(images.to(vae.device)).latent_dist.mode()
    return float(1.0 / latents.float().std())


def train_vae(
    work: Path, settings: TrainSettings, log: Callable[[str], None] | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Train the VAE in ``work`` (resuming from its newest checkpoint); export it to ``work/vae`` and, given
    ``out``, the ``init`` pipeline with it to ``out``."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device()
    torch.manual_seed(settings.seed)
    vae = _start_vae(settings).to(device)
    decoder_only = bool(settings.extra.get("decoder_only"))
    if decoder_only:  # the latent space stays the one a UNet was trained on; only how latents are drawn changes
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=0.0)
    config = {"model": "vae", **asdict(settings)}
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(work)
    step = load_checkpoint(checkpoint, {"vae": vae}, optimizer, config) if checkpoint else 0
    _log(log, f"vae: {param_count(vae):,} parameters, from step {step} to {settings.steps} on {device}")
    started = time.process_time()
    vae.train()
    while step < settings.steps:
        rng, generator = training_generators(settings, "vae", step)
        images, _ = render_batch(rng, settings.batch, world=world_of(settings))
        images = images.to(device)
        _set_lr(optimizer, settings, step)
        with _autocast(device):
            posterior = vae.encode(images).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            recon = vae.decode(latents).sample
        # MSE for PSNR, L1 for sharp edges; a tiny KL keeps the latent bounded (as SD's VAE).
        loss = F.mse_loss(recon.float(), images) + 0.5 * F.l1_loss(recon.float(), images)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        step += 1
        if step % 20 == 0:
            _log(log, f"vae step {step} loss {loss.item():.4f} cpu {time.process_time() - started:.0f}s")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save_checkpoint(work, step, {"vae": vae}, optimizer, config)
    vae.eval()
    if not decoder_only:  # a frozen encoder keeps the latents, so their scale stays the UNet's
        vae.register_to_config(scaling_factor=latent_scale(vae, settings.eval_images, world=world_of(settings)))
    _replace_dir(work / "vae", lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))
    if out is not None:
        _export_with_vae(Path(settings.extra["init"]), out, work / "vae")
    result = {
        "steps": step,
        "params": param_count(vae),
        "psnr_db": psnr(vae, settings.eval_images, world=world_of(settings)),
        "scaling_factor": vae.config.scaling_factor,
    }
    _log(log, f"vae done: {json.dumps(result)}")
    return result


def _start_vae(settings: TrainSettings):
    """A new VAE, or the one of the ``init`` pipeline folder (its ``vae/``) to go on from."""
    init = settings.extra.get("init")
    if not init:
        return build_vae()
    from diffusers import AutoencoderKL

    folder = Path(init) / "vae"
    if not (folder / "config.json").is_file():
        raise MlgenError(f"no VAE in {folder}: --init takes a text-to-image pipeline folder or built-in name")
    return AutoencoderKL.from_pretrained(folder)


def _export_with_vae(pipeline: Path, out: Path, vae: Path) -> None:
    """``out``: a copy of the ``pipeline`` folder whose ``vae/`` is ``vae`` (built aside, swapped in whole)."""

    def build(tmp: Path) -> None:
        shutil.copytree(pipeline, tmp, ignore=shutil.ignore_patterns("vae"))
        shutil.copytree(vae, tmp / "vae")

    _replace_dir(out, build)


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999) -> None:
        import copy

        self.module = copy.deepcopy(module).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema_p, p in zip(self.module.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - decay)


def _scheduler_for_training():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, **BETAS)


def export_pipeline(out: Path, vae, unet, text_encoder, tokenizer) -> None:
    """Save a standard StableDiffusionPipeline folder (Euler scheduler, no safety checker)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, steps_offset=1, **BETAS),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _replace_dir(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def encode_captions(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def train_unet(
    work: Path, out: Path, settings: TrainSettings, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train UNet + text encoder on the VAE in ``work/vae``; export the EMA pipeline to ``out``.

    The pipeline is exported at every checkpoint too, so a long run always leaves usable weights.
    """
    from diffusers import AutoencoderKL

    init = settings.extra.get("init")  # a pipeline folder to start from (its VAE, UNet and text encoder)
    vae_folder = Path(init) / "vae" if init and not (work / "vae").is_dir() else work / "vae"
    if not (vae_folder / "config.json").is_file():
        raise MlgenError(f"no trained VAE in {vae_folder}: run 'mlgen world train vae --work {work}' first")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device()
    torch.manual_seed(settings.seed)
    vae = AutoencoderKL.from_pretrained(vae_folder).to(device).eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    tokenizer = pruned_tokenizer(vocabulary_words(world_shapes()))
    if init:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(Path(init) / "text_encoder").to(device)
        unet = UNet2DConditionModel.from_pretrained(Path(init) / "unet").to(device)
    else:
        text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).to(device)
        unet = build_unet(tuple(settings.extra.get("channels", UNET_CHANNELS))).to(device)
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = Ema(models, float(settings.extra.get("ema_decay", 0.999)))  # a fine-tune uses a shorter average
    optimizer = torch.optim.AdamW(models.parameters(), lr=settings.lr, weight_decay=1e-2)
    scheduler = _scheduler_for_training()
    alphas = scheduler.alphas_cumprod.to(device)
    snr_gamma = float(settings.extra.get("snr_gamma", 5.0))
    empty_share = float(settings.extra.get("empty_share", 0.1))
    config = {"model": "unet", **asdict(settings), "vocab": len(tokenizer)}
    unet_work = work / "unet"
    unet_work.mkdir(parents=True, exist_ok=True)
    modules = {"models": models, "ema": ema.module}
    checkpoint = latest_checkpoint(unet_work)
    step = load_checkpoint(checkpoint, modules, optimizer, config) if checkpoint else 0
    _log(
        log,
        f"unet: {param_count(unet):,} + text encoder {param_count(text_encoder):,} parameters "
        f"(vocabulary {len(tokenizer)}), from step {step} to {settings.steps} on {device}",
    )
    started = time.process_time()
    loss = torch.tensor(float("nan"))
    models.train()
    while step < settings.steps:
        rng, generator = training_generators(settings, "unet", step)
        images, labels = render_batch(rng, settings.batch, world=world_of(settings))
        captions = [random_caption(names, rng) if rng.random() >= empty_share else "" for names in labels]
        noise = torch.randn((settings.batch, 4, SIZE // 4, SIZE // 4), generator=generator)
        eps = torch.randn(noise.shape, generator=generator)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (settings.batch,), generator=generator)
        images, noise, eps, timesteps = (t.to(device) for t in (images, noise, eps, timesteps))
        _set_lr(optimizer, settings, step)
        with torch.no_grad(), _autocast(device):
            posterior = vae.encode(images).latent_dist
            latents = (posterior.mean + posterior.std * eps).float() * scale
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with _autocast(device):
            hidden = encode_captions(tokenizer, text_encoder, captions, device)
            prediction = unet(noisy, timesteps, hidden).sample
        # min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction.
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weight = snr.clamp(max=snr_gamma) / snr
        loss = (weight * (prediction.float() - noise).pow(2).flatten(1).mean(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        ema.update(models, step)
        step += 1
        if step % 20 == 0:
            _log(log, f"unet step {step} loss {loss.item():.4f} cpu {time.process_time() - started:.0f}s")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            save_checkpoint(unet_work, step, modules, optimizer, config)
            export_pipeline(out, vae, ema.module["unet"], ema.module["text_encoder"], tokenizer)
    if not (out / "model_index.json").is_file():  # resumed a finished run into a new --out
        export_pipeline(out, vae, ema.module["unet"], ema.module["text_encoder"], tokenizer)
    result = {
        "steps": step,
        "unet_params": param_count(unet),
        "text_encoder_params": param_count(text_encoder),
        "vocabulary": len(tokenizer),
        "last_loss": float(loss.item()),
    }
    _log(log, f"unet done: {json.dumps(result)}")
    return result
