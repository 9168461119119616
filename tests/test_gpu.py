"""The CUDA paths (fp16 models, larger batches). Skipped where no GPU is present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlgen.config import FilterConfig, GenerateConfig, PromptsConfig
from mlgen.pipeline.rundir import RunDir
from mlgen.workflow import filter_images, generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_generate_and_filter_in_fp16_on_cuda(tmp_path: Path) -> None:
    from mlgen.generate.diffusion import load_pipeline
    from mlgen.models.registry import load_open_clip

    device = torch.device("cuda")
    assert load_pipeline("tiny", device, "auto").unet.dtype == torch.float16
    assert load_open_clip("tiny", device)[0].logit_scale.dtype == torch.float16
    run = RunDir(tmp_path)
    marker = generate(run, GenerateConfig(steps=4, shard_size=8), PromptsConfig(llm="template"), ["cat", "dog", "car"])
    assert marker["counts"]["images"] == 6
    filtered = filter_images(run, FilterConfig())
    assert filtered["counts"]["images"] == 6
