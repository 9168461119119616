"""The generate stage in-process on the tiny model: presets, scheduler, attention, overlapped I/O,
failed samples, the fine-tuned text encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from mlgen.config import GenerateConfig, PromptsConfig
from mlgen.errors import MlgenError
from mlgen.generate.diffusion import load_pipeline, to_uint8
from mlgen.generate.presets import apply_preset, preset_for
from mlgen.generate.stage import GenerateStage
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.stage import PromptStage

CPU = torch.device("cpu")
FAST = dict(model="tiny", steps=2, size=64, shard_size=3, batch_size=2, images_per_prompt=2)


@pytest.fixture(scope="module")
def prompts_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prompts")
    run_stage(PromptStage(RunDir(root), PromptsConfig(llm="template"), ["zebra", "kite"]))
    return root


def _fresh_run(prompts_run: Path, tmp_path: Path, name: str) -> RunDir:
    import shutil

    shutil.copytree(prompts_run, tmp_path / name)
    return RunDir(tmp_path / name)


def _members(folder: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            out[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return out


def test_presets_follow_the_model_id_and_flags_win() -> None:
    assert preset_for("stabilityai/stable-diffusion-2") == "sd2"
    assert preset_for("stabilityai/stable-diffusion-2-1-base") == "sd2-base"
    assert preset_for("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert preset_for("stabilityai/sdxl-turbo") == "sd-turbo"
    assert preset_for("runwayml/stable-diffusion-v1-5") == "sd15"
    assert preset_for("tiny") == "tiny" and preset_for("someone/other-model") == "default"
    paper = apply_preset(GenerateConfig(model="stabilityai/stable-diffusion-2"))
    assert (paper.size, paper.steps, paper.guidance, paper.scheduler) == (768, 50, 7.5, "euler")
    turbo = apply_preset(GenerateConfig(model="stabilityai/sd-turbo", steps=4))
    assert (turbo.steps, turbo.guidance) == (4, 0.0)
    with pytest.raises(MlgenError, match="unknown preset 'sd9'"):
        apply_preset(GenerateConfig(model="tiny", preset="sd9"))


def test_scheduler_is_set_explicitly_and_attention_is_sdpa() -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = load_pipeline("tiny", CPU, "auto", "euler")
    assert type(pipe.scheduler) is EulerDiscreteScheduler and pipe.unet.dtype == torch.float32
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    assert type(load_pipeline("tiny", CPU, "auto", "ddim").scheduler) is DDIMScheduler


def test_nan_and_black_images_are_reported() -> None:
    images = np.full((3, 4, 4, 3), 0.5, dtype=np.float32)
    images[1, 0, 0, 0] = np.nan
    images[2] = 0.0
    pixels, reasons = to_uint8(images)
    assert reasons == [None, "nan", "black"] and pixels.dtype == np.uint8


def test_overlapped_writing_gives_the_same_shards(prompts_run: Path, tmp_path: Path) -> None:
    outputs = []
    for overlap in (True, False):
        run = _fresh_run(prompts_run, tmp_path, f"overlap-{overlap}")
        stage = GenerateStage(run, GenerateConfig(**FAST))
        stage.overlap = overlap
        run_stage(stage)
        raw = run.stage_dir("raw")
        manifests = [pq.read_table(p).to_pylist() for p in sorted(raw.glob("0*.parquet"))]
        outputs.append((_members(raw), manifests))
    assert outputs[0][0] and outputs[0] == outputs[1]
    meta = json.loads(next(iter(outputs[0][0].values()))["json"])
    assert meta["scheduler"] == "euler" and meta["steps"] == 2


def test_failed_samples_are_listed_and_the_stage_finishes(prompts_run: Path, tmp_path: Path) -> None:
    run = _fresh_run(prompts_run, tmp_path, "nan")
    stage = GenerateStage(run, GenerateConfig(**FAST))
    setup = stage.setup

    def poisoned_setup(ranks) -> None:  # a UNet that overflows, as fp16 sometimes does
        setup(ranks)
        with torch.no_grad():
            stage.pipe.unet.conv_out.bias.fill_(float("nan"))

    stage.setup = poisoned_setup
    marker = run_stage(stage)
    total = len(pq.read_table(run.stage_dir("prompts") / "prompts.parquet")) * FAST["images_per_prompt"]
    assert marker["counts"]["failed"] == total and marker["counts"]["images"] == 0
    rows = [r for p in sorted(run.stage_dir("raw").glob("0*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == total and {r["failed"] for r in rows} == {"nan"}
    assert _members(run.stage_dir("raw")) == {}


def test_fine_tuned_text_encoder_is_used_and_hashed(prompts_run: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    from mlgen.finetune import text_encoder_hash
    from mlgen.models.registry import diffusers_folder

    run = _fresh_run(prompts_run, tmp_path, "te")
    encoder = CLIPTextModel.from_pretrained(Path(diffusers_folder("tiny")) / "text_encoder")
    name = next(n for n, _ in encoder.named_parameters() if n.endswith("final_layer_norm.bias"))
    with torch.no_grad():
        encoder.get_parameter(name).add_(0.5)  # a "fine-tuned" encoder: different outputs
    encoder.save_pretrained(run.root / "text_encoder")
    stage = GenerateStage(run, GenerateConfig(**FAST))
    expected = text_encoder_hash(run.root / "text_encoder")
    assert stage.settings()["text_encoder_hash"] == expected
    run_stage(stage)
    assert torch.equal(stage.pipe.text_encoder.get_parameter(name), encoder.get_parameter(name))
    samples = _members(run.stage_dir("raw"))
    assert samples and all(json.loads(s["json"])["text_encoder_hash"] == expected for s in samples.values())
    with pytest.raises(MlgenError, match="text encoder folder not found"):
        GenerateStage(run, GenerateConfig(**FAST, text_encoder=str(tmp_path / "nope")))
