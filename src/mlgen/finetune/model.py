"""The differentiable path of the CLIP-score discriminative loss (Diff-ZS-MLC, methods.md A).

prompt -> text encoder (trainable) -> denoising steps (frozen UNet) -> VAE decoder (frozen)
-> resize + normalise in torch -> CLIP image encoder (frozen) -> grouping softmax -> ASL.
Every step of it is a torch op, so the loss's gradient reaches the text encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mlgen.classifiers.losses import asymmetric_loss_probs
from mlgen.errors import MlgenError
from mlgen.finetune.names import loss_names
from mlgen.models.registry import diffusers_folder, hub_file, load_open_clip, warn_random_weights

# LoRA on the attention projections of the CLIP text encoder (as diffusers' LoRA training scripts).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def check_text_encoder(name: str) -> str:
    """The model's pipeline folder (or hub id), once it is known to have a text encoder to train."""
    folder = diffusers_folder(name)
    index_path = Path(folder) / "model_index.json"
    if not index_path.is_file():
        index_path = Path(hub_file(folder, "model_index.json", "diffusion model"))
    index = json.loads(index_path.read_text(encoding="utf-8"))
    entry = index.get("text_encoder")
    if not entry or entry[0] is None or index.get("tokenizer", [None])[0] is None:
        raise MlgenError(f"diffusion model '{name}' has no text encoder (and tokenizer) to fine-tune")
    second_encoder = (index.get("text_encoder_2") or [None])[0]
    if second_encoder is not None or index.get("unet", [None, None])[1] != "UNet2DConditionModel":
        raise MlgenError(f"diffusion model '{name}': finetune trains Stable Diffusion 1.x/2.x-style pipelines only")
    if entry[1] != "CLIPTextModel":
        raise MlgenError(f"diffusion model '{name}': its text encoder is a {entry[1]}; finetune trains a CLIPTextModel")
    return folder


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 (fp16 without bf16 support) on CUDA and none on CPU."""
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


@dataclass
class Parts:
    """The models of one fine-tuning run; only ``text_encoder`` has trainable parameters."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any
    clip: torch.nn.Module
    clip_size: tuple[int, int]
    clip_mean: Tensor  # [1, 3, 1, 1]
    clip_std: Tensor
    class_features: Tensor  # [C, D], normalised CLIP text features of each class's bare names (loss_names)
    logit_scale: Tensor
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None = full precision

    @property
    def frozen(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "clip": self.clip}


def class_text_features(clip_model, tokenizer, names: list[list[str]], device: torch.device) -> Tensor:
    """[C, D] the discriminator's text side: each name's bare CLIP text feature (normalised), then the normalised
    mean over a class's names (its label, then its aliases: ``evaluate --zero-shot clip``'s mean, bare names)."""
    flat = [name for group in names for name in group]
    with torch.no_grad():  # the paper scores bare class names, like the filter
        per_name = F.normalize(clip_model.encode_text(tokenizer(flat).to(device)).float(), dim=-1)
    groups = per_name.split([len(group) for group in names])
    return F.normalize(torch.stack([group.mean(0) for group in groups]), dim=-1)


def load_parts(
    model: str,
    clip: str,
    classes: list[str],
    device: torch.device,
    mixed_precision: str,
    gradient_checkpointing: bool,
    aliases: dict[str, list[str]] | None = None,
    best_names: dict[str, str] | None = None,
) -> Parts:
    """Load the diffusion model (text encoder in fp32) and the CLIP discriminator, all but the text encoder frozen.

    A class's text feature is :func:`class_text_features` of its name and its ``aliases`` (the user's names, so
    a label the discriminator knows only by another name is still scored by what it knows); with ``best_names``
    (``--names-from``) a label's best name takes its own name's place (:func:`mlgen.finetune.names.loss_names`)."""
    from diffusers import DiffusionPipeline

    folder = check_text_encoder(model)
    warn_random_weights(model, "model")
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise MlgenError(f"cannot load diffusion model '{model}': {str(err).splitlines()[0][:200]}") from None
    amp = amp_dtype(mixed_precision, device)
    frozen_dtype = amp or torch.float32  # frozen weights may live in half precision: they get no update
    unet = pipe.unet.to(device, frozen_dtype).eval().requires_grad_(False)
    vae = pipe.vae.to(device, frozen_dtype).eval().requires_grad_(False)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    text_encoder = pipe.text_encoder.to(device, torch.float32).eval()  # eval: no dropout, so runs repeat exactly
    clip_model, _, clip_tokenizer = load_open_clip(clip, device)
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip_model)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    class_features = class_text_features(
        clip_model, clip_tokenizer, [loss_names(c, best_names, aliases) for c in classes], device
    )
    return Parts(
        tokenizer=pipe.tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=pipe.scheduler,
        clip=clip_model,
        clip_size=tuple(size),
        clip_mean=torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1),
        clip_std=torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1),
        class_features=class_features,
        logit_scale=clip_model.logit_scale.exp().float().detach(),
        device=device,
        amp=amp,
    )


def add_lora(text_encoder: torch.nn.Module, rank: int, alpha: float | None, seed: int) -> torch.nn.Module:
    """Wrap the text encoder with peft LoRA adapters; only they train (seeded: every rank starts alike)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=LORA_TARGETS, init_lora_weights=True)
    return get_peft_model(text_encoder, config)


def encode_prompts(parts: Parts, texts: list[str]) -> Tensor:
    """Per-token text embeddings (the UNet's cross-attention input), as the diffusers pipeline makes them."""
    tokens = parts.tokenizer(
        texts, padding="max_length", max_length=parts.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return parts.text_encoder(input_ids=tokens.input_ids.to(parts.device))[0]


def vae_scale(parts: Parts) -> int:
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


def render(
    parts: Parts,
    prompts: list[str],
    negatives: list[str],
    generator: torch.Generator,
    steps: int,
    size: int,
    guidance: float,
    grad_steps: int | None,
) -> Tensor:
    """Images in [0, 1], [N, 3, size, size], differentiable w.r.t. the text encoder.

    Only the last ``grad_steps`` denoising steps record a graph (earlier ones run without
    gradient: less memory, the gradient flows through the text embeddings of those steps).
    """
    cond = encode_prompts(parts, prompts)
    cfg = guidance > 1
    embeddings = torch.cat([encode_prompts(parts, negatives), cond]) if cfg else cond
    scheduler = type(parts.scheduler).from_config(parts.scheduler.config)  # fresh step counter per image
    scheduler.set_timesteps(steps, device=parts.device)
    side = size // vae_scale(parts)
    shape = (len(prompts), parts.unet.config.in_channels, side, side)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(parts.device)
    latents = latents * scheduler.init_noise_sigma
    first_with_grad = steps - (grad_steps or steps)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_with_grad):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            dtype = parts.unet.dtype
            noise = parts.unet(model_input.to(dtype), t, encoder_hidden_states=embeddings.to(dtype)).sample.float()
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    vae = parts.vae
    image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (image / 2 + 0.5).clamp(0, 1)


def clip_logits(parts: Parts, images: Tensor) -> Tensor:
    """CLIP logits [N, C] of images in [0, 1]: open_clip's resize + normalise, done in torch (differentiable)."""
    x = F.interpolate(images, size=parts.clip_size, mode="bicubic", align_corners=False, antialias=True)
    x = (x - parts.clip_mean) / parts.clip_std
    dtype = parts.clip.logit_scale.dtype
    features = F.normalize(parts.clip.encode_image(x.to(dtype)).float(), dim=-1)
    return parts.logit_scale * features @ parts.class_features.T


def filter_rules() -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[..., Tensor]]:
    """The filter's batched ``grouping_softmax(logits [N,C], requested bool [N,C])`` and ``exact_set_keep``.

    They are exported by :mod:`mlgen.filters`; a checkout that has only the filter's per-image
    functions (:mod:`mlgen.filters.discriminator`) gets them applied row by row.
    """
    import mlgen.filters

    if hasattr(mlgen.filters, "grouping_softmax") and hasattr(mlgen.filters, "exact_set_keep"):
        return mlgen.filters.grouping_softmax, mlgen.filters.exact_set_keep
    from mlgen.filters import discriminator

    def grouping_softmax(logits: Tensor, requested: Tensor) -> Tensor:
        rows = zip(logits, requested, strict=True)
        return torch.stack([discriminator.grouping_softmax(row, r.nonzero().flatten().tolist()) for row, r in rows])

    def exact_set_keep(probs: Tensor, requested: Tensor, threshold: float = 0.5) -> Tensor:
        rows = zip(probs, requested, strict=True)
        return torch.tensor([discriminator.keep(p, r.nonzero().flatten().tolist(), threshold)[0] for p, r in rows])

    return grouping_softmax, exact_set_keep


def discriminative_loss(logits: Tensor, requested: Tensor) -> tuple[Tensor, Tensor]:
    """(ASL summed per image, then averaged over images; grouping-softmax probabilities [N, C]).

    The paper's loss: ASL (gamma- 4, gamma+ 0, clip 0.05) on the grouping-softmax probabilities
    with no further sigmoid, against the multi-hot of the requested labels.
    """
    grouping_softmax, _ = filter_rules()
    probs = grouping_softmax(logits.float(), requested)
    loss = asymmetric_loss_probs(probs, requested.float(), gamma_neg=4.0, gamma_pos=0.0, clip=0.05, reduction="sum")
    return loss / len(logits), probs
