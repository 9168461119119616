"""`bench/device_check.sh --cpu`: the GPU check's dry mode runs each step at tiny sizes into device_check.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "env",
    "generate",
    "finetune",
    "gpu_tests",
    "tiling",
    "compile",
    "random_lm",
    "prompts_transformers",
    "prompts_vllm",
    "sdxl",
]


def device_check(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(ROOT / "bench" / "device_check.sh"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cpu_dry_mode_reports_every_step(tmp_path: Path) -> None:
    result = device_check("--cpu", tmp_path / "check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "device_check.json").read_text())
    assert report["mode"] == "cpu" and report["finished"] and report["budget_s"] > 0
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] in ("ok", "skip"), step
        assert isinstance(step["seconds"], float) and step["seconds"] >= 0
        if step["status"] == "skip":
            assert len(step["reason"]) > 10, step
        else:
            assert (tmp_path / "check" / step["log"]).is_file()
            assert step["figures"], step
            assert all(step.get("checks", {}).values()), step
    steps = {s["name"]: s for s in report["steps"]}
    assert report["summary"] == {"ok": 5, "skip": 5, "failed": 0}
    assert steps["env"]["figures"]["torch"] and steps["env"]["figures"]["gpu"] is None
    generate = steps["generate"]["figures"]["generate"]
    assert generate["images"] == 2 and generate["images_per_s"] > 0 and generate["attention"]
    finetune = steps["finetune"]["figures"]["finetune"]
    assert finetune["steps_per_s"] > 0 and finetune["autocast"] is None and len(finetune["losses"]) == 1
    assert steps["gpu_tests"]["status"] == "skip" and "needs a CUDA GPU" in steps["gpu_tests"]["reason"]
    assert steps["gpu_tests"]["figures"]["tests"] >= 4  # every gpu-marked test was collected, then skipped
    assert steps["random_lm"]["figures"]["parameters"] > 10**6
    counts = steps["prompts_transformers"]["figures"]["counts"]
    # 3 label sets, 2 prompts each; a set the random LM left short gets one template prompt
    assert counts["label_sets"] == 3 and 3 <= counts["prompts"] <= 6 and counts["requests"] > 0
    assert "device check (cpu): 5 ok, 5 skipped, 0 failed" in result.stdout


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    """A step whose command fails is `failed` with its exit status and log tail; the script goes on and exits 1."""
    out = tmp_path / "check"
    helper = [sys.executable, str(ROOT / "bench" / "device_check.py")]
    subprocess.run([*helper, "init", out, "cpu", "60"], check=True)
    (out / "logs").mkdir()
    (out / "logs" / "generate.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    subprocess.run([*helper, "record", out, "generate", "--rc", "1", "--started", "0", "--limit", "60"], check=True)
    subprocess.run([*helper, "skip", out, "compile", "no compiler here"], check=True)
    finished = subprocess.run([*helper, "finish", out], capture_output=True, text=True)
    assert finished.returncode == 1 and "1 failed" in finished.stdout
    report = json.loads((out / "device_check.json").read_text())
    failed, skipped = report["steps"]
    assert failed["status"] == "failed" and failed["reason"] == "exit status 1: RuntimeError: CUDA out of memory"
    assert "Traceback" in failed["error"] and skipped == {
        "name": "compile",
        "status": "skip",
        "seconds": 0.0,
        "reason": "no compiler here",
    }
    assert report["summary"] == {"ok": 0, "skip": 1, "failed": 1}


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    result = device_check()
    assert result.returncode == 2 and result.stderr.strip() == "usage: bench/device_check.sh [--cpu] OUT_FOLDER"
    if not __import__("torch").cuda.is_available():
        result = device_check(tmp_path / "x")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "no CUDA GPU here" in result.stderr
