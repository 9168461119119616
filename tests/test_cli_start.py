"""The command line starts without torch: ``mlgen --help`` and a refused command answer before any model code."""

from __future__ import annotations

import subprocess
import sys

from conftest import mlgen


def test_the_cli_imports_no_torch_until_a_command_needs_it() -> None:
    probe = "import sys, mlgen.cli.app; print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_a_refused_predict_is_one_line(tmp_path) -> None:
    result = mlgen("predict", "x.png", "--run", tmp_path / "nosuch")
    assert result.returncode == 1
    assert result.stderr.strip() == f"mlgen: error: no run directory at {tmp_path / 'nosuch'}"
