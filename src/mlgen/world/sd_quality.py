"""How often the toy text-to-image model draws exactly what it is asked, as the toy CLIP judges it.

This is the filter stage's own rule (grouping softmax over bare class names, then the exact-set
keep rule) applied to images generated for every label pair, so the share is the fraction of
generated images ``mlgen filter`` would keep.
"""

from __future__ import annotations

import torch
from PIL import Image

from mlgen.filters import exact_set_keep, grouping_softmax, requested_mask
from mlgen.generate.diffusion import load_pipeline, render
from mlgen.models.registry import load_open_clip
from mlgen.prompts.composer import label_pairs, template_prompt


def exact_set_share(
    classes: list[str],
    per_set: int = 2,
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
    model: str = "toy",
    clip: str = "toy",
    threshold: float = 0.5,
) -> dict:
    """Generate ``per_set`` images for every label pair of ``classes``; the share CLIP keeps, overall and per set."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, device, "auto")
    clip_model, preprocess, tokenizer = load_open_clip(clip, device)
    with torch.inference_mode():
        text = torch.nn.functional.normalize(clip_model.encode_text(tokenizer(classes).to(device)).float(), dim=-1)
    scale = clip_model.logit_scale.exp().float()
    index = {label: i for i, label in enumerate(classes)}
    kept, per_label_set = 0, {}
    sets = label_pairs(classes)
    for set_number, label_set in enumerate(sets):
        prompt = template_prompt(label_set)
        seeds = [seed * 1_000_003 + set_number * 1000 + i for i in range(per_set)]
        images = render(pipe, [prompt] * per_set, [""] * per_set, seeds, steps, 64, guidance)
        pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images]).to(device)
        with torch.inference_mode():
            features = torch.nn.functional.normalize(clip_model.encode_image(pixels).float(), dim=-1)
            logits = (scale * features @ text.T).cpu()
        requested = requested_mask([[index[label] for label in label_set]] * per_set, len(index))
        hits = int(exact_set_keep(grouping_softmax(logits, requested), requested, threshold).sum())
        per_label_set["+".join(label_set)] = hits / per_set
        kept += hits
    return {
        "share": kept / (per_set * len(sets)),
        "images": per_set * len(sets),
        "steps": steps,
        "per_set": per_label_set,
    }
