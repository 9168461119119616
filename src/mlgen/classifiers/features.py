"""Frozen CLIP image and text features for the classifier."""

from __future__ import annotations

import io

import torch
from PIL import Image

from mlgen.progress import progress


def image_features(model, preprocess, images: list[bytes], device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP image embeddings [N, D] (float32, CPU) of encoded images."""
    chunks = []
    batches = range(0, len(images), batch_size)
    for start in progress(batches, "image features", "batch", disable=len(images) <= batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch])
        pixels = pixels.to(device, model.logit_scale.dtype)  # fp16 on CUDA
        with torch.inference_mode():
            chunks.append(torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.visual.output_dim)


def label_embeddings(
    model, tokenizer, labels: list[str], device: torch.device, template: str = "a photo of a {}."
) -> torch.Tensor:
    """CLIP text embeddings of ``template`` filled with each label (the zero-shot classifier's weights)."""
    with torch.inference_mode():
        text = model.encode_text(tokenizer([template.format(label) for label in labels]).to(device))
    return torch.nn.functional.normalize(text.float(), dim=-1).cpu()
