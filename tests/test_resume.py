"""A generate run killed with SIGKILL mid-stage resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import mlgen
from helpers import images_by_key, manifest_keys, manifest_rows

# 3 labels -> 6 label sets -> 6 prompts x 4 images = 24 samples in 6 shards.
ARGS = ["--llm", "template", "--denoising-steps", "6", "--size", "64", "--shard-size", "4", "--batch-size", "2",
        "--images-per-prompt", "4"]  # fmt: skip


def start_generate(run: Path, classes: Path, args: list[str] = ARGS) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlgen", "generate", "--run", str(run), "--classes", str(classes), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for(path_glob: str, folder: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while len(list(folder.glob(path_glob))) < count:
        assert proc.poll() is None, "generate finished before it could be killed"
        assert time.time() < deadline, "generate made no progress"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    classes = tmp / "classes.txt"
    classes.write_text("zebra\nsurfboard\nkite\n")
    result = mlgen("generate", "--run", tmp / "run", "--classes", classes, *ARGS)
    assert result.returncode == 0, result.stderr
    return tmp / "run"


@pytest.mark.parametrize("finished_before_kill", [1, 3])
def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path, uninterrupted, finished_before_kill):
    classes = tmp_path / "classes.txt"
    classes.write_text("zebra\nsurfboard\nkite\n")
    run = tmp_path / "run"
    proc = start_generate(run, classes)
    wait_for("raw/*_stats.json", run, finished_before_kill, proc)
    wait_for("raw/.*.tar.tmp-*", run, 1, proc)  # the next shard's tar is being written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raw = run / "raw"
    assert list(raw.glob(".*.tar.tmp-*")), "the kill landed between shards"  # a killed process cleans up nothing
    assert not (raw / "_SUCCESS.json").exists()
    done_before = {p.name for p in raw.glob("*_stats.json")}
    assert 0 < len(done_before) < 6

    result = mlgen("generate", "--run", run, "--classes", classes, *ARGS)
    assert result.returncode == 0, result.stderr

    keys = manifest_keys(raw)
    assert len(keys) == len(set(keys)) == 24  # every planned key exactly once
    assert keys == manifest_keys(uninterrupted / "raw")
    assert manifest_rows(raw) == manifest_rows(uninterrupted / "raw")  # the same drawn label sets and prompts
    assert json.loads((raw / "plan.json").read_text())["settings"]["label_draw"]  # pairs: each image draws its set
    assert images_by_key(raw) == images_by_key(uninterrupted / "raw")  # byte-identical, every tar read to its end
    assert not list(raw.glob(".*tmp*")), "temporary files left behind"
    assert (raw / "_SUCCESS.json").exists()


def test_rerun_of_a_finished_stage_does_no_work(tmp_path, uninterrupted):
    stats = sorted(uninterrupted.glob("raw/*_stats.json"))
    before = [p.stat().st_mtime_ns for p in stats]
    classes = tmp_path / "classes.txt"
    classes.write_text("zebra\nsurfboard\nkite\n")
    result = mlgen("generate", "--run", uninterrupted, *ARGS)
    assert result.returncode == 0, result.stderr
    assert [p.stat().st_mtime_ns for p in stats] == before


def test_a_second_process_on_the_same_stage_stops_with_one_line(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("zebra\nsurfboard\nkite\n")
    run = tmp_path / "run"
    # The holder must outlive the second process's start-up (importing torch takes seconds on a busy CPU).
    slow = [*ARGS, "--denoising-steps", "200"]
    first = start_generate(run, classes, slow)
    try:
        wait_for("raw/plan.json", run, 1, first)
        second = mlgen("generate", "--run", run, *slow)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"mlgen: error: another mlgen process is running stage 'raw' in {run}"
        )
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    result = mlgen("generate", "--run", run, *ARGS, "--overwrite")  # the killed holder released its lock
    assert result.returncode == 0, result.stderr
