"""The command line starts without torch: ``mlgen --help`` and a refused command answer before any model code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import mlgen


def test_the_cli_imports_no_torch_until_a_command_needs_it() -> None:
    probe = "import sys, mlgen.cli.app; print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_refused_predict_is_one_line(tmp_path) -> None:
    result = mlgen("predict", "x.png", "--run", tmp_path / "nosuch")
    assert result.returncode == 1
    assert result.stderr.strip() == f"mlgen: error: no run directory at {tmp_path / 'nosuch'}"


# Refusals that need no model: each answers before torch is imported (checked, not timed).
REFUSED_BEFORE_TORCH = {
    "predict-missing-image": ["predict", "nope.png", "--run", "R"],
    "predict-untrained": ["predict", "x.png", "--run", "R"],
    "report-before-filter": ["report", "--run", "R"],
    "zero-shot-unknown": ["evaluate", "--run", "R", "--zero-shot", "nosuch", "--data", "d.csv"],
    "zero-shot-missing-data": ["evaluate", "--run", "R", "--zero-shot", "clip", "--data", "missing.csv"],
    "zero-shot-s3-without-synonyms": ["evaluate", "--run", "R", "--zero-shot", "s3", "--data", "d.csv"],
    "missing-template": ["prompts", "--run", "P", "--classes", "c.txt", "--llm", "template", "--prompt-template", "n"],
    "export-no-folder": ["export", "nofolder", "o.json"],
}
PROBE = """import sys
from mlgen.cli.app import main
try:
    main()
except SystemExit as done:
    print("torch" in sys.modules, done.code)
"""


@pytest.mark.parametrize("name", list(REFUSED_BEFORE_TORCH))
def test_refusals_answer_before_torch_loads(name: str, tmp_path) -> None:
    (tmp_path / "R" / "raw").mkdir(parents=True)
    (tmp_path / "R" / "classes.txt").write_text("zebra\nkite\n")
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    (tmp_path / "x.png").write_text("not an image\n")
    (tmp_path / "d.csv").write_text("image,labels\nx.png,zebra\n")
    args = REFUSED_BEFORE_TORCH[name]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.stderr.startswith("mlgen: error:") and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout.split() == ["False", "1"], result.stdout + result.stderr
