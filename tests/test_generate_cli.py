"""generate as users type it: prompts reused, stale stages shown by status, Ctrl-C resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import mlgen

FAST = ["--denoising-steps", "2", "--size", "64", "--shard-size", "4", "--batch-size", "2"]


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_four_commands_in_a_fresh_folder_then_stale_status(tmp_path: Path) -> None:
    (tmp_path / "unseen.txt").write_text("zebra\nkite\n", encoding="utf-8")
    _ok(mlgen("prompts", "--classes", "unseen.txt", "--llm", "template", cwd=tmp_path))
    prompts_marker = (tmp_path / "mlgen-run" / "prompts" / "_SUCCESS.json").read_text()
    # generate's own default llm (smollm2) is not a change: the template prompts are reused.
    _ok(mlgen("generate", "--classes", "unseen.txt", *FAST, cwd=tmp_path))
    assert (tmp_path / "mlgen-run" / "prompts" / "_SUCCESS.json").read_text() == prompts_marker
    _ok(mlgen("filter", cwd=tmp_path))
    _ok(mlgen("train-classifier", "--epochs", "2", cwd=tmp_path))
    status = _ok(mlgen("status", cwd=tmp_path))
    assert "STALE" not in status and status.count("finished") == 4, status

    # An explicit prompt option that differs is a change, and says so.
    changed = mlgen("generate", "--classes", "unseen.txt", "--llm", "smollm2", *FAST, cwd=tmp_path)
    assert changed.returncode == 1 and "'llm' changed from 'template' to 'smollm2'" in changed.stderr

    _ok(mlgen("generate", "--overwrite", *FAST, "--seed", "1", cwd=tmp_path))
    lines = {line.split()[0]: line for line in _ok(mlgen("status", cwd=tmp_path)).splitlines()}
    assert "STALE" in lines["filtered"] and "'raw'" in lines["filtered"], lines
    assert "STALE" not in lines["raw"] and "STALE" not in lines["prompts"]
    _ok(mlgen("filter", "--overwrite", cwd=tmp_path))
    lines = {line.split()[0]: line for line in _ok(mlgen("status", cwd=tmp_path)).splitlines()}
    assert "STALE" not in lines["filtered"] and "'filtered'" in lines["classifier"], lines


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child: SIGINT unblocked and handled by default, as in an interactive shell. A suite started as a
    background job (`make test &`, as non-interactive bash starts it) runs with SIGINT ignored, every child inherits
    that, and the run then finishes with status 0 whatever the test sends."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.slow
def test_ctrl_c_keeps_finished_shards_and_a_rerun_resumes(tmp_path: Path) -> None:
    (tmp_path / "unseen.txt").write_text("zebra\nkite\nbench\n", encoding="utf-8")
    _ok(mlgen("prompts", "--classes", "unseen.txt", "--llm", "template", cwd=tmp_path))
    # enough shards that a loaded machine cannot finish them all between the first stats file and the signal
    args = ["generate", *FAST, "--shard-size", "2", "--denoising-steps", "4", "--images-per-prompt", "8"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlgen", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    raw = tmp_path / "mlgen-run" / "raw"
    deadline = time.time() + 240
    while not list(raw.glob("*_stats.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]  # after the progress bars
    assert lines[-1] == "mlgen: interrupted: finished shards are kept; run the same command again to resume", err
    assert "Traceback" not in err
    done = {p.name for p in raw.glob("*_stats.json")}
    assert done and not (raw / "_SUCCESS.json").exists()
    before = {name: (raw / name).stat().st_mtime_ns for name in done}
    _ok(mlgen(*args, cwd=tmp_path))
    assert (raw / "_SUCCESS.json").exists() and len(list(raw.glob("*_stats.json"))) > len(done)
    assert all((raw / name).stat().st_mtime_ns == mtime for name, mtime in before.items())  # not redone


def test_help_lists_the_commands_in_pipeline_order() -> None:
    result = mlgen("--help", env={"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    names = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and line[2:3].isalpha()]
    pipeline = ["prompts", "finetune", "generate", "filter", "train-classifier", "evaluate", "predict", "report"]
    assert names[: len(pipeline)] == pipeline, names
