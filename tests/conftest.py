"""Shared fixtures: the real ``mlgen`` command in a subprocess, offline, and small label files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: unknown names must fail fast

# Small settings that keep a generate run to a few seconds on a 2-core CPU.
FAST_GENERATE = ["--llm", "template", "--steps", "2", "--size", "64", "--shard-size", "4", "--batch-size", "2"]


def mlgen(*args: str | Path, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run ``python -m mlgen ARGS`` as a real process; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "mlgen", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def classes_file(tmp_path: Path) -> Path:
    path = tmp_path / "unseen.txt"
    path.write_text("# unseen labels\nzebra\nsurfboard\n\nKite\n", encoding="utf-8")
    return path
