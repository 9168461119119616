"""Fine-tuning's CUDA path: mixed precision (bf16, and fp16 with loss scaling). Skipped without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlgen.config import FinetuneConfig
from mlgen.finetune.model import amp_dtype, load_parts
from mlgen.finetune.stage import FinetuneStage, every_rank
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from test_finetune import CLASSES, make_run, read_log

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path: Path, precision: str) -> None:
    run = make_run(tmp_path)
    config = FinetuneConfig(
        model="tiny", clip="tiny", size=32, steps=2, learning_rate=1e-3, max_train_steps=4, log_every=1, mixed_precision=precision
    )
    stage = FinetuneStage(RunDir(run), config)
    run_stage(stage, ranks=every_rank())
    cuda = torch.device("cuda")
    assert amp_dtype("auto", cuda) in (torch.bfloat16, torch.float16)
    assert stage.parts.unet.dtype == amp_dtype(precision, cuda)  # frozen weights in half precision
    assert next(stage.parts.text_encoder.parameters()).dtype == torch.float32  # trained weights stay fp32
    assert all(math.isfinite(row["loss"]) for row in read_log(run))
    trained = load_file(run / "text_encoder" / "model.safetensors")
    base = load_parts("tiny", "tiny", CLASSES, torch.device("cpu"), "no", False).text_encoder.state_dict()
    if precision == "auto":  # fp16 loss scaling may skip the first steps while it finds its scale
        assert any(not torch.equal(trained[k], base[k]) for k in trained)
