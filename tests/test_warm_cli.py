"""The warm ``mlgen`` server (``warm_cli``) answers as a fresh ``python -m mlgen`` does.

Most tests run their commands through it to skip ~10 s of imports each; these compare it with a fresh
interpreter on commands that depend on the working folder, the environment and the exit status.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import warm_cli
from conftest import mlgen


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--help"], {"COLUMNS": "97"}),  # the width comes from the environment given to this command
        (["prompts", "--classes", "c.txt", "--llm", "template", "--set-size", "0"], {}),  # a usage error
        (["prompts", "--classes", "nosuch.txt", "--llm", "template"], {}),  # relative to the working folder
        (["status"], {}),  # the default run folder, relative to the working folder
        (["status"], {"MLGEN_RUN": "elsewhere"}),
        (["status", "--run", "c.txt"], {}),  # a refusal: one line and status 1 either way
    ],
)
def test_a_warm_command_answers_as_a_fresh_one(args: list[str], env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    (tmp_path / "mlgen-run" / "raw").mkdir(parents=True)
    (tmp_path / "mlgen-run" / "classes.txt").write_text("zebra\nkite\n")
    fresh = mlgen(*args, cwd=tmp_path, env=env, fresh=True)
    # the warm server itself, even under MLGEN_TEST_FRESH=1 (where mlgen() would start a fresh one again)
    warm = warm_cli.run([str(a) for a in args], tmp_path, {**os.environ, **env}, timeout=300)
    assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
