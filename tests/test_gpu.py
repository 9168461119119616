"""The CUDA paths (fp16 models, larger batches). Skipped where no GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlgen.config import FilterConfig, GenerateConfig, PromptsConfig
from mlgen.pipeline.rundir import RunDir
from mlgen.workflow import filter_images, generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_generate_and_filter_in_fp16_on_cuda(tmp_path: Path) -> None:
    from mlgen.generate.diffusion import load_pipeline
    from mlgen.models.registry import load_open_clip

    device = torch.device("cuda")
    assert load_pipeline("tiny", device, "auto").unet.dtype == torch.float16
    assert load_open_clip("tiny", device)[0].logit_scale.dtype == torch.float16
    run = RunDir(tmp_path)
    marker = generate(run, GenerateConfig(model="tiny", steps=4, shard_size=8), PromptsConfig(llm="template"), ["cat", "dog", "car"])
    assert marker["counts"]["images"] == 6
    filtered = filter_images(run, FilterConfig(clip="tiny"))
    assert filtered["counts"]["images"] == 6


def test_generate_gpu_paths_are_chosen_automatically() -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mlgen.generate.diffusion import auto_batch_size, configure_memory, load_pipeline, render_checked

    device = torch.device("cuda")
    pipe = load_pipeline("tiny", device, "bf16", "euler")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert auto_batch_size(device, 512, torch.float16) > auto_batch_size(device, 1024, torch.float16) >= 1
    assert auto_batch_size(device, 512, torch.float16) > auto_batch_size(device, 512, torch.float32)
    configure_memory(pipe, device, 768, 4)
    assert pipe.vae.use_slicing
    compiled = load_pipeline("tiny", device, "auto", "euler", compile_unet=True)
    images, reasons = render_checked(compiled, ["a cat"] * 2, [""] * 2, [1, 2], 2, 64, 7.5)
    assert images.shape == (2, 64, 64, 3) and reasons == [None, None]
