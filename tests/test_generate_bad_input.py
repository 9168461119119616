"""generate's bad input ends in one clear line (real processes, real files)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from conftest import FAST_GENERATE, mlgen


def _one_line(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("mlgen: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_a_folder_that_is_not_text_to_image(tmp_path: Path, classes_file: Path) -> None:
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}), encoding="utf-8")
    result = mlgen("generate", "--run", tmp_path / "run", "--classes", classes_file, "--model", folder, *FAST_GENERATE)
    _one_line(result, "DDPMPipeline", "not a text-to-image pipeline")
    assert not (tmp_path / "run" / "prompts").exists()  # refused before any work


def test_unknown_preset_and_scheduler(tmp_path: Path, classes_file: Path) -> None:
    base = ["generate", "--run", tmp_path / "run", "--classes", classes_file, *FAST_GENERATE]
    _one_line(mlgen(*base, "--preset", "sd9"), "unknown preset 'sd9'", "sd2")
    _one_line(mlgen(*base, "--scheduler", "eulerr"), "unknown scheduler 'eulerr'", "euler")


def _small_disk() -> None:
    """A 'disk' that takes 40 kB per file: writes past it fail with EFBIG instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def test_full_disk_while_writing_a_shard(tmp_path: Path, classes_file: Path) -> None:
    run = tmp_path / "run"
    assert mlgen("prompts", "--run", run, "--classes", classes_file, "--llm", "template").returncode == 0
    args = ["generate", "--run", run, *FAST_GENERATE, "--images-per-prompt", "4", "--shard-size", "8"]
    result = subprocess.run(
        [sys.executable, "-m", "mlgen", *map(str, args), "--size", "128"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLGEN_GENERATE_IMAGE_FORMAT": "png"},
        preexec_fn=_small_disk,
    )
    _one_line(result, "raw shard 00000 could not be written", "not marked done", "rerun")
    raw = run / "raw"
    assert not (raw / "00000_stats.json").exists() and not (raw / "_SUCCESS.json").exists()
    assert not [p for p in raw.iterdir() if ".tmp" in p.name]  # no partial file left behind


def test_unreachable_quota_ends_the_run_naming_the_short_labels(tmp_path: Path) -> None:
    (tmp_path / "unseen.txt").write_text("zebra\nkite\n", encoding="utf-8")
    (tmp_path / "mlgen.yaml").write_text(
        "run: run\nclasses: unseen.txt\nprompts: {llm: template}\n"
        "generate: {steps: 2, size: 64, shard_size: 8, batch_size: 4}\n"
        "filter: {threshold: 1.0, gate: 0, min_keep: 0}\n",  # keeps nothing: no number of rounds fills the quota
        encoding="utf-8",
    )
    result = mlgen("run", "--config", "mlgen.yaml", "--quota", "3", "--max-rounds", "1", cwd=tmp_path)
    _one_line(result, "quota 3 not reached in 1 rounds", "zebra (0/3)", "kite (0/3)")
    assert not (tmp_path / "run" / "classifier").exists()
