"""Stable Diffusion through diffusers: loading, per-sample seeds, batched rendering."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image

from mlgen.errors import MlgenError
from mlgen.models.registry import diffusers_folder, torch_dtype


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


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_size(pipe, size: int, name: str) -> None:
    """Reject a side the UNet cannot take (latents must halve cleanly at every down block)."""
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if size % multiple or size < multiple:
        raise MlgenError(f"image size {size} does not fit model '{name}': use a multiple of {multiple}")


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
