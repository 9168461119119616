"""Real architectures with random weights, built offline from configs shipped in the package.

``archs/*.json`` hold the UNet, VAE, text encoder(s) and scheduler configs of the public model repos
(copied from their ``config.json`` files); CLIP architectures are open_clip's own model configs. The
weights are seeded random numbers: the compute and memory of the real model, none of its quality. Built
folders are cached (``MLGEN_CACHE``), in float16 to halve the disk they take.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mlgen.errors import MlgenError
from mlgen.paths import build_dir_atomic, cache_dir

ARCHS = ("sd2", "sd15", "sdxl", "sd-turbo")
CLIP_ARCHS = ("ViT-B-32", "RN50", "ViT-L-14")
VERSION = "v1"  # bump when a config below changes, so old caches are not reused


@cache
def arch_spec(arch: str) -> dict[str, Any]:
    if arch not in ARCHS:
        raise MlgenError(f"unknown --arch '{arch}': choose one of {', '.join(ARCHS)}")
    return json.loads((resources.files("mlgen.bench") / "archs" / f"{arch}.json").read_text(encoding="utf-8"))


def random_pipeline_dir(arch: str) -> Path:
    """A diffusers folder of ``arch`` with random weights (built on first use, then cached)."""
    arch_spec(arch)  # an unknown arch fails before anything is built
    return build_dir_atomic(cache_dir() / f"random-{arch}-{VERSION}", lambda out: _build_pipeline(arch, out))


def _build_pipeline(arch: str, out: Path) -> None:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mlgen.models.tiny import clip_tokenizer

    spec = arch_spec(arch)
    torch.manual_seed(0)
    parts: dict[str, Any] = {
        "unet": diffusers.UNet2DConditionModel.from_config(spec["unet"]),
        "vae": diffusers.AutoencoderKL.from_config(spec["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])),
        "tokenizer": clip_tokenizer(),
        "scheduler": diffusers.EulerDiscreteScheduler.from_config(spec["scheduler"]),
    }
    if "text_encoder_2" in spec:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"]))
        parts["tokenizer_2"] = clip_tokenizer()
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, spec["pipeline"])(**parts)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)


def random_clip_dir(arch: str) -> Path:
    """An open_clip ``arch`` with random weights (``local-dir:`` layout), built on first use."""
    import open_clip

    from mlgen.models.tiny import build_random_clip

    config = open_clip.get_model_config(arch)
    if arch not in CLIP_ARCHS or config is None:
        raise MlgenError(f"unknown --clip-arch '{arch}': choose one of {', '.join(CLIP_ARCHS)}")
    return build_dir_atomic(cache_dir() / f"random-clip-{arch}-{VERSION}", lambda out: build_random_clip(out, config))


def parameter_count(arch: str) -> dict[str, int]:
    """Parameters per component of ``arch``, counted on the meta device (no memory, no weights)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = arch_spec(arch)
    with torch.device("meta"):
        models = {
            "unet": diffusers.UNet2DConditionModel.from_config(spec["unet"]),
            "vae": diffusers.AutoencoderKL.from_config(spec["vae"]),
            **{k: CLIPTextModel(CLIPTextConfig(**spec[k])) for k in ("text_encoder", "text_encoder_2") if k in spec},
        }
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
