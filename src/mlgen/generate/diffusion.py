"""Stable Diffusion through diffusers: loading, per-sample seeds, batched rendering."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mlgen.errors import MlgenError
from mlgen.models.registry import diffusers_folder, hub_file, torch_dtype


def sample_seed(run_seed: int, prompt_id: int, image_index: int) -> int:
    """The seed of one image: fixed by the run seed, the prompt and the image index alone,
    so resumed, re-batched or multi-rank runs draw the same noise."""
    digest = hashlib.sha256(f"{run_seed}/{prompt_id}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # non-negative int64


def load_pipeline(name: str, device: torch.device, dtype: str):
    from diffusers import DiffusionPipeline

    folder = diffusers_folder(name)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch_dtype(dtype, device))
    except (OSError, ValueError) as err:
        raise MlgenError(f"cannot load diffusion model '{name}': {str(err).splitlines()[0][:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None  # a filter stage follows; it would blank images silently
    return pipe.to(device)


def component_config(folder: str, component: str) -> dict:
    """A pipeline component's config.json, read without loading any weights."""
    path = Path(folder) / component / "config.json"
    if not path.is_file():
        path = Path(hub_file(folder, f"{component}/config.json", "diffusion model"))
    return json.loads(path.read_text(encoding="utf-8"))


def size_rules(folder: str) -> tuple[int, int]:
    """(native image side, the multiple every side must be) of a Stable Diffusion-style pipeline."""
    unet, vae = component_config(folder, "unet"), component_config(folder, "vae")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample_size = unet["sample_size"]
    native = (sample_size if isinstance(sample_size, int) else sample_size[0]) * vae_scale
    # Latents must halve cleanly at every UNet down block.
    return native, vae_scale * 2 ** (len(unet["block_out_channels"]) - 1)


def image_side(name: str, size: int | None) -> int:
    """The image side to render: ``size`` checked against the model, or the model's native side."""
    native, multiple = size_rules(diffusers_folder(name))
    if size is None:
        return native
    if size % multiple or size < multiple:
        raise MlgenError(f"image size {size} does not fit model '{name}': use a multiple of {multiple}")
    return size


def render(pipe, prompts: list[str], negatives: list[str], seeds: list[int], steps: int, size: int, guidance: float):
    """Images (uint8 HWC arrays) for one batch; each image's noise comes from its own seed."""
    device = pipe.device
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        output = pipe(
            prompt=prompts,
            negative_prompt=negatives,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generators,
            output_type="np",
        )
    return (np.clip(output.images, 0, 1) * 255).round().astype(np.uint8)


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format]
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    Image.fromarray(pixels).save(buffer, format=pil_format, **options)
    return buffer.getvalue()
