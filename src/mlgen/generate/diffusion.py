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
from mlgen.models.registry import diffusers_folder, hub_file, torch_dtype, warn_random_weights


def sample_seed(run_seed: int, prompt_id: int, image_index: int) -> int:
    """The seed of one image: fixed by the run seed, the prompt and the image index alone,
    so resumed, re-batched or multi-rank runs draw the same noise."""
    digest = hashlib.sha256(f"{run_seed}/{prompt_id}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # non-negative int64


SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",  # the paper's (and the SD 2 model card's)
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "model": None,  # the scheduler the model folder ships
}


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise MlgenError(f"unknown scheduler '{name}': choose one of {', '.join(SCHEDULERS)}")


def check_text_to_image(name: str) -> str:
    """The model's pipeline class, after checking AutoPipelineForText2Image can load it as text-to-image."""
    folder = diffusers_folder(name)  # first: an unknown name fails before the slow import below
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        index = Path(hub_file(folder, "model_index.json", "diffusion model"))
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (ValueError, KeyError, TypeError):
        raise MlgenError(f"{name}: model_index.json names no pipeline class") from None
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING, _get_task_class

    if _get_task_class(AUTO_TEXT2IMAGE_PIPELINES_MAPPING, class_name, throw_error_if_not_exist=False) is None:
        raise MlgenError(f"{name} is a {class_name}, not a text-to-image pipeline: pass a text-to-image model")
    return class_name


def load_pipeline(
    name: str,
    device: torch.device,
    dtype: str,
    scheduler: str = "euler",
    compile_unet: bool = False,
    text_encoder: Path | None = None,
):
    """A text-to-image pipeline on ``device``: fp16 on CUDA (fp32 on CPU), SDPA attention, the given scheduler."""
    from diffusers import AutoPipelineForText2Image

    check_text_to_image(name)
    warn_random_weights(name, "model")
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(diffusers_folder(name), dtype=torch_dtype(dtype, device))
    except (OSError, ValueError) as err:
        raise MlgenError(f"cannot load diffusion model '{name}': {str(err).splitlines()[0][:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None  # a filter stage follows; it would blank images silently
    set_scheduler(pipe, scheduler)
    if text_encoder is not None:
        from mlgen.finetune import load_text_encoder

        pipe.text_encoder = load_text_encoder(text_encoder, pipe.text_encoder)
    pipe = pipe.to(device)
    use_sdpa(pipe)
    if compile_unet and hasattr(pipe, "unet"):
        pipe.unet = torch.compile(pipe.unet)  # first batches compile (minutes); later ones run faster on CUDA
    return pipe


def set_scheduler(pipe, name: str) -> None:
    """Set the sampler explicitly (keeping the model's schedule config: betas, prediction type, spacing)."""
    import diffusers

    check_scheduler(name)
    if SCHEDULERS[name] is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def use_sdpa(pipe) -> None:
    """Fused scaled-dot-product attention (torch 2): replace any classic attention processor left set."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for part in ("unet", "vae"):
        module = getattr(pipe, part, None)
        if module is None or not hasattr(module, "attn_processors"):
            continue
        processors = module.attn_processors
        if any(type(p) is AttnProcessor for p in processors.values()):
            module.set_attn_processor(
                {key: AttnProcessor2_0() if type(p) is AttnProcessor else p for key, p in processors.items()}
            )


def configure_memory(pipe, device: torch.device, size: int, batch_size: int) -> None:
    """On CUDA, decode large outputs piecewise: VAE slicing (one image at a time) for big batches
    of large images, tiling above 1024 px; neither changes the model, both cut the decode's peak."""
    if device.type != "cuda" or not hasattr(pipe, "vae"):
        return
    if size >= 768 and batch_size > 1:
        pipe.vae.enable_slicing()
    if size > 1024:
        pipe.vae.enable_tiling()


def auto_batch_size(device: torch.device, size: int, dtype: torch.dtype) -> int:
    """Images per batch: 8 on CPU; on CUDA what fits in free memory (about 1.2 GiB per 512 px image
    in fp16 with guidance, scaled by the pixel count), between 1 and 32."""
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_image = 1.2 * 2**30 * (size / 512) ** 2 * (2 if dtype == torch.float32 else 1)
    return max(1, min(32, int(0.7 * free / per_image)))


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
    return render_checked(pipe, prompts, negatives, seeds, steps, size, guidance)[0]


def to_uint8(images: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """uint8 images from the pipeline's floats, and per image why it failed (None when fine).

    NaN appears when fp16 overflows; an all-black image is what a safety checker or a broken VAE
    returns. Both are reported rather than written as if they were pictures.
    """
    finite = np.isfinite(images).all(axis=(1, 2, 3))
    pixels = (np.clip(np.nan_to_num(images, nan=0.0), 0, 1) * 255).round().astype(np.uint8)
    reasons = [None if ok else "nan" for ok in finite]
    reasons = [r or ("black" if img.max() == 0 else None) for r, img in zip(reasons, pixels, strict=True)]
    return pixels, reasons


def render_checked(
    pipe, prompts: list[str], negatives: list[str], seeds: list[int], steps: int, size: int, guidance: float
) -> tuple[np.ndarray, list[str | None]]:
    """:func:`render`, plus per image the reason it failed (``nan``, ``black``) or None."""
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
    return to_uint8(output.images)


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format]
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    Image.fromarray(pixels).save(buffer, format=pil_format, **options)
    return buffer.getvalue()
