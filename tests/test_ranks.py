"""torchrun with two processes splits shards i % 2 and produces the single-process result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import mlgen
from helpers import images_by_key, manifest_keys, manifest_rows

ARGS = ["--classes", None, "--llm", "template", "--denoising-steps", "3", "--size", "64", "--shard-size", "3",
        "--batch-size", "3", "--images-per-prompt", "2"]  # fmt: skip


def test_torchrun_two_ranks_equals_one_process(tmp_path: Path, classes_file: Path) -> None:
    args = [str(classes_file) if a is None else a for a in ARGS]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    mlgen_script = shutil.which("mlgen", path=os.path.dirname(sys.executable))
    assert torchrun and mlgen_script
    # torchrun gives each rank one thread; the single run must too for bit-identical floats.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", mlgen_script, "generate", "--run-dir", str(two), *args],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = tmp_path / "one"
    result = mlgen("generate", "--run", one, *args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr

    raw = two / "raw"
    shards = json.loads((raw / "plan.json").read_text())["shards"]
    assert len(shards) == 4  # 6 label sets x 2 images / 3 per shard
    assert all((raw / f"{s['shard']:05d}_stats.json").exists() for s in shards)
    assert manifest_keys(raw) == manifest_keys(one / "raw")
    assert manifest_rows(raw) == manifest_rows(one / "raw")  # each image drew the same label set and prompt
    assert json.loads((raw / "plan.json").read_text())["settings"]["label_draw"]
    assert images_by_key(raw) == images_by_key(one / "raw")
    marker = json.loads((raw / "_SUCCESS.json").read_text())
    assert marker["counts"]["images"] == 12
