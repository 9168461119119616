"""Text-encoder fine-tuning on the tiny models: the loss falls, only the text encoder learns,
gradients reach it, LoRA saves adapters only, a SIGKILLed run resumes to the same weights, and
two torchrun ranks equal one process."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import mlgen
from mlgen.config import FinetuneConfig, PromptsConfig, build_config
from mlgen.finetune import load_text_encoder, text_encoder_hash
from mlgen.finetune.model import clip_logits, discriminative_loss, load_parts, render
from mlgen.finetune.stage import FinetuneStage, every_rank
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import run_stage
from mlgen.prompts.stage import PromptStage

CLASSES = ["zebra", "kite", "surfboard"]
# Tiny and fast: 32 px, 2 denoising steps; tiny models need a far larger lr than the paper's 7e-8.
FAST = ["--size", "32", "--denoising-steps", "2", "--learning-rate", "1e-3"]
FAST_SETTINGS = {"model": "tiny", "clip": "tiny", "size": 32, "steps": 2, "learning_rate": 1e-3}


def make_run(tmp_path: Path, name: str = "run", one_set: bool = True) -> Path:
    """A run with template prompts for three labels (optionally only the prompts of the set zebra+kite)."""
    run = tmp_path / name
    run_stage(PromptStage(RunDir(run), PromptsConfig(llm="template"), CLASSES))  # in-process: no 4 s start-up
    if one_set:
        path = run / "prompts" / "prompts.parquet"
        table = pq.read_table(path)
        rows = [r for r in table.to_pylist() if r["labels"] == ["zebra", "kite"]]
        assert len(rows) == 1
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return run


def read_log(run: Path) -> list[dict[str, float]]:
    with open(run / "finetune" / "log.csv", encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_loss_falls_and_only_the_text_encoder_changes(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    config = build_config(FinetuneConfig, {**FAST_SETTINGS, "max_train_steps": 20, "log_every": 5})
    stage = FinetuneStage(RunDir(run), config)
    marker = run_stage(stage, ranks=every_rank())
    assert marker["counts"]["steps"] == 20

    log = read_log(run)
    assert [row["step"] for row in log] == [5, 10, 15, 20]
    assert (log[-1]["loss"] + log[-2]["loss"]) / 2 < log[0]["loss"] - 0.5, log
    assert (run / "finetune" / "log.png").stat().st_size > 1000

    fresh = load_parts("tiny", "tiny", CLASSES, torch.device("cpu"), "no", False)
    for name, module in stage.parts.frozen.items():
        before, after = state_dict(getattr(fresh, name)), state_dict(module)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
        assert not any(p.requires_grad for p in module.parameters())
    trained = load_file(run / "text_encoder" / "model.safetensors")
    base = fresh.text_encoder.state_dict()
    changed = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert len(changed) > len(trained) // 2
    # What generate loads is what was trained.
    loaded = load_text_encoder(run / "text_encoder", fresh.text_encoder)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.items())
    assert len(text_encoder_hash(run / "text_encoder")) == 16


@pytest.mark.parametrize("grad_steps", [1, None])
def test_gradients_reach_the_text_encoder(grad_steps: int | None) -> None:
    grads = []
    for checkpointing in (False, True):
        parts = load_parts("tiny", "tiny", CLASSES, torch.device("cpu"), "no", checkpointing)
        parts.text_encoder.requires_grad_(True)
        generator = torch.Generator().manual_seed(0)
        images = render(parts, ["a zebra next to a kite"], [""], generator, 3, 32, 7.5, grad_steps)
        requested = torch.tensor([[True, True, False]])
        loss, probs = discriminative_loss(clip_logits(parts, images), requested)
        assert probs.shape == (1, 3) and torch.isfinite(loss)
        loss.backward()
        trained = [p.grad for p in parts.text_encoder.parameters() if p.grad is not None]
        assert trained and all(torch.isfinite(g).all() for g in trained)
        assert sum(float(g.abs().sum()) for g in trained) > 0
        for module in parts.frozen.values():
            assert all(p.grad is None for p in module.parameters())
        grads.append(torch.cat([g.flatten() for g in trained]))
    # Gradient checkpointing saves memory and changes nothing else.
    torch.testing.assert_close(grads[0], grads[1])


def test_lora_saves_only_adapters_and_loads_back(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    result = mlgen("finetune", "--run", run, *FAST, "--max-train-steps", "3", "--lora-rank", "4")
    assert result.returncode == 0, result.stderr
    folder = run / "text_encoder"
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "mlgen_finetune.json",
    }
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)

    cpu = torch.device("cpu")
    base = load_parts("tiny", "tiny", CLASSES, cpu, "no", False)
    tokens = base.tokenizer(["a zebra next to a kite"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base.text_encoder(tokens)[0]
        after = load_text_encoder(folder, base.text_encoder)(tokens)[0]
        # The same adapters, restored from the last checkpoint instead of the output folder.
        from mlgen.finetune.model import add_lora

        reference = load_parts("tiny", "tiny", CLASSES, cpu, "no", False).text_encoder
        reference = add_lora(reference, 4, None, 0)
        weights = load_file(run / "finetune" / "checkpoints" / "step-000003" / "trainable.safetensors")
        params = dict(reference.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
        expected = reference(tokens)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigkill_resume_ends_with_the_same_weights(tmp_path: Path) -> None:
    run = make_run(tmp_path, one_set=False)
    args = ["finetune", *FAST, "--max-train-steps", "6", "--save-every", "2", "--log-every", "3"]
    straight = tmp_path / "straight"
    shutil.copytree(run, straight)
    assert mlgen(*args, "--run", straight).returncode == 0

    process = subprocess.Popen(
        [sys.executable, "-m", "mlgen", *args, "--run", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (run / "finetune" / "checkpoints" / "step-000002").exists() and time.time() < deadline:
        assert process.poll() is None, "finished before it could be killed"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "finetune" / "_SUCCESS.json").exists() and not (run / "text_encoder").exists()

    result = mlgen(*args, "--run", run)
    assert result.returncode == 0, result.stderr
    assert "resuming after step" in result.stdout
    resumed = load_file(run / "text_encoder" / "model.safetensors")
    expected = load_file(straight / "text_encoder" / "model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert read_log(run) == read_log(straight)


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path: Path) -> None:
    run = make_run(tmp_path, one_set=False)
    one = tmp_path / "one"
    shutil.copytree(run, one)
    args = [*FAST, "--max-train-steps", "3", "--train-batch-size", "2", "--log-every", "1"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    script = shutil.which("mlgen", path=os.path.dirname(sys.executable))
    assert torchrun and script
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default: the same float kernels in both runs
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", script, "finetune", "--run-dir", str(run), *args],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = mlgen("finetune", "--run", one, *args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr

    two_ranks = load_file(run / "text_encoder" / "model.safetensors")
    one_process = load_file(one / "text_encoder" / "model.safetensors")
    base = load_parts("tiny", "tiny", CLASSES, torch.device("cpu"), "no", False).text_encoder.state_dict()
    assert any(not torch.equal(one_process[k], base[k]) for k in one_process)
    # Each rank's gradient is its image's share of the batch mean; the sum of two shares is exact.
    assert all(torch.equal(two_ranks[k], v) for k, v in one_process.items())
    assert read_log(run) == read_log(one)
