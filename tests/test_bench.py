"""`mlgen bench` on the tiny models (the table, bench.json) and `mlgen run --dry-run` reading it; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import BUILTIN_MODELS, mlgen


def one_line_error(result, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("mlgen: error:") and all(w in lines[0] for w in words), lines


def printed_rates(stdout: str, figures: dict) -> None:
    """The table's rows are the figures of bench.json: stage rate, bare rate, then their quotient, per stage
    (a swapped or stale column fails here; the ratio itself is a timing and is not asserted)."""
    rows = {line[:26].strip(): line[26:].split() for line in stdout.splitlines() if line.endswith(tuple("0123456789"))}
    for name, digits in (("generate", 3), ("filter", 2)):
        stage = figures[name]
        expected = [f"{stage['images_per_s']:.{digits}f}", f"{stage['bare_images_per_s']:.{digits}f}"]
        assert rows[f"{name} images/s"] == [*expected, f"{stage['ratio']:.3f}"], (rows, stage)
        assert stage["ratio"] == pytest.approx(stage["images_per_s"] / stage["bare_images_per_s"], rel=1e-9)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = [
        "--model",
        "tiny",
        "--clip",
        "tiny",
        "--size",
        "64",
        "--steps",
        "2",
        "--images",
        "4",
        "--filter-images",
        "8",
        "--finetune-steps",
        "1",
    ]
    result = mlgen("bench", *args, "--out", out, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generate images/s" in result.stdout and "projected: --quota 200 --labels 17" in result.stdout
    return out, result.stdout


@pytest.fixture(scope="module")
def bench_json(bench_run) -> Path:
    return bench_run[0]


def test_bench_writes_every_figure(bench_run) -> None:
    figures = json.loads(bench_run[0].read_text())
    g, f = figures["generate"], figures["filter"]
    assert g["images"] == 4 and g["size"] == 64 and g["steps"] == 2 and g["batch_size"] == 8  # CPU: 8
    assert g["images_per_s"] > 0 and g["bare_images_per_s"] > 0
    printed_rates(bench_run[1], figures)
    assert g["dtype"] == "float32" and g["attention"] and not (g["vae_slicing"] or g["vae_tiling"] or g["compiled"])
    assert f["images"] == 8 and f["images_per_s"] > 0 and f["bare_images_per_s"] > 0
    t = figures["finetune"]
    assert t["steps_per_s"] > 0 and t["autocast"] is None and t["gradient_checkpointing"] and len(t["losses"]) == 1
    assert figures["finetune_skipped"] is None and figures["memory"]["peak_rss_gib"] > 0.1
    p = figures["projection"]
    assert p["labels"] == 17 and p["images"] >= 17 * 200 // 2  # a pair image counts for two labels
    expected = p["images"] / g["images_per_s"] + p["images"] / f["images_per_s"]
    assert abs(p["total_seconds"] - expected) <= 1


def test_dry_run_reads_the_config_and_bench_without_loading(bench_json: Path, tmp_path: Path) -> None:
    (tmp_path / "unseen.txt").write_text("zebra\nkite\nsurfboard\n")
    config = {
        "classes": str(tmp_path / "unseen.txt"),
        "prompts": {"llm": "smollm2", "prompts_per_set": 5},
        # a hub id that is not here (HF_HUB_OFFLINE): a dry run must not load it
        "generate": {"model": "stabilityai/stable-diffusion-2", "images_per_prompt": 4, "shard_size": 50, "size": 128},
        "filter": {"clip": "ViT-B-32/openai"},
    }
    (tmp_path / "mlgen.yaml").write_text(yaml.safe_dump(config))
    unset = dict.fromkeys(BUILTIN_MODELS)  # the config's own models, not the tests' built-in ones
    result = mlgen(
        "run", "--config", tmp_path / "mlgen.yaml", "--dry-run", "--bench", bench_json, cwd=tmp_path, env=unset
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "label sets  6 (pairs)" in out and "prompts     30 (5 per set" in out
    assert "images      120 (4 per prompt, each image's label set drawn)" in out
    assert "per label about: zebra 76, kite 76, surfboard 76" in out  # 120 x 17/27: alone 1/27, in a pair 16/27
    assert "shards      raw 3 x 50 images" in out and "preset sd2: 128 px, 50 steps" in out
    figures = json.loads(bench_json.read_text())
    seconds = 120 * (128 / 64) ** 2 * (50 / 2) / figures["generate"]["images_per_s"]
    assert "time        about" in out and str(bench_json) in out
    assert f"generate {seconds / 60:.0f} min" in out or f"generate {seconds:.0f} s" in out, out
    assert "disk        about" in out
    assert not (tmp_path / "mlgen-run").exists()  # nothing written


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["bench", "--arch", "sd3"], ("--arch 'sd3'", "sd2")),
        (["bench", "--clip-arch", "ViT-X"], ("--clip-arch 'ViT-X'",)),
        (["bench", "--quota", "0"], ("--quota",)),
    ],
)
def test_bench_bad_input_is_one_line(args: list[str], words: tuple[str, ...], tmp_path: Path) -> None:
    one_line_error(mlgen(*args, cwd=tmp_path), *words)
    assert not (tmp_path / "bench.json").exists()


def test_dry_run_on_unknown_keys_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mlgen.yaml").write_text("finetune: {max_steps: 3}\n")
    one_line_error(mlgen("run", "--config", tmp_path / "mlgen.yaml", "--dry-run"), "unknown setting 'max_steps'")
    (tmp_path / "mlgen.yaml").write_text("generat: {steps: 3}\n")
    one_line_error(mlgen("run", "--config", tmp_path / "mlgen.yaml", "--dry-run"), "unknown section 'generat'")


@pytest.mark.slow
def test_bench_a_real_architecture_on_cpu(tmp_path: Path) -> None:
    """`--arch sd2` on CPU: one image per batch, the fine-tuning step skipped with its reason (a batch of 8 and a
    real-size training step took minutes on 2 cores). At 64 px (41 s here; 256 px, the issue's command, took
    117 s): the same real-size UNet and text encoder, the same code path."""
    args = ["bench", "--arch", "sd2", "--clip", "tiny", "--size", "64", "--steps", "2"]
    result = mlgen(*args, cwd=tmp_path, timeout=1200)  # the threads conftest gives each test process
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mlgen bench on cpu: sd2 (random weights), 64 px, 2 steps, float32" in result.stdout
    assert "skipped on CPU with --arch" in result.stdout and "batch size chosen: 1" in result.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    g = figures["generate"]
    assert g["images"] == 1 and g["batch_size"] == 1 and g["size"] == 64 and figures["arch"] == "sd2"
    assert figures["filter"]["images"] == 8
    assert figures["finetune"] is None and "--finetune-steps 1" in figures["finetune_skipped"]
    # Stage vs bare is a timing (0.92 and 1.87 measured on a machine at load 7-8): not asserted; the table must
    # print the figures bench.json holds.
    printed_rates(result.stdout, figures)
