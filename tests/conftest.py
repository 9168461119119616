"""Shared fixtures: the real ``mlgen`` command in a subprocess, offline, and small label files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import warm_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: unknown names must fail fast

# Every command a test runs names the built-in random-weight models through the stages' variables: the defaults
# are the paper's real models, which cannot be had offline (tests of the defaults drop these variables).
BUILTIN_MODELS = {
    "MLGEN_GENERATE_MODEL": "tiny",
    "MLGEN_FINETUNE_MODEL": "tiny",
    "MLGEN_FINETUNE_CLIP": "tiny",
    "MLGEN_FILTER_CLIP": "tiny",
    "MLGEN_CLASSIFIER_CLIP": "tiny",
}
for _name, _model in BUILTIN_MODELS.items():
    os.environ.setdefault(_name, _model)


def pytest_configure(config: pytest.Config) -> None:
    """Share the cores out among pytest-xdist's test processes before they start (they inherit os.environ).

    Each test process starts torch processes of its own; if each of them uses every core, OpenMP threads
    spin waiting on each other: two tiny demos side by side took 3 min 50 s on 2 cores, 41 s with one
    thread each. A user's own OMP_NUM_THREADS wins.
    """
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


# The longest files (by `pytest --durations=0`), longest first: xdist's loadfile hands out files in collection
# order, alphabetical by default, which left several of these to the end and one process idle for minutes.
LONG_FILES = (
    "test_experiment.py",
    "test_pipeline.py",
    "test_multinode.py",
    "test_device_check.py",
    "test_repro_recipe.py",
    "test_filter_reliability.py",
    "test_user_path.py",
    "test_prompts_stage.py",
    "test_bench.py",
    "test_finetune.py",
    "test_ranks.py",
    "test_world_sd.py",
    "test_zsl_on_disk.py",
    "test_zsl_benchmarks.py",
    "test_classifier_stage.py",
    "test_classifier_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first (``LONG_FILES``), then the others; each file's tests keep their order."""
    rank = {name: index for index, name in enumerate(LONG_FILES)}
    position = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), position[id(item)]))


# Small settings that keep a generate run to a few seconds on a 2-core CPU.
FAST_GENERATE = ["--llm", "template", "--denoising-steps", "2", "--size", "64", "--shard-size", "4"]
FAST_GENERATE += ["--batch-size", "2"]


def mlgen(
    *args: str | Path,
    cwd: Path | None = None,
    timeout: int = 300,
    env: dict[str, str | None] | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``python -m mlgen ARGS`` as a real process; returns the CompletedProcess (text).

    The process is forked from a server that has imported torch & co. (see ``warm_cli``); ``fresh=True``
    starts a new interpreter instead, for what depends on process start-up. ``MLGEN_TEST_FRESH=1`` makes
    every command fresh (to rule the warm server out when a test fails).
    """
    args_text = [str(arg) for arg in args]
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset
    if not (fresh or os.environ.get("MLGEN_TEST_FRESH") == "1"):
        return warm_cli.run(args_text, cwd, full_env, timeout)
    return subprocess.run(
        [sys.executable, "-m", "mlgen", *args_text],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def classes_file(tmp_path: Path) -> Path:
    path = tmp_path / "unseen.txt"
    path.write_text("# unseen labels\nzebra\nsurfboard\n\nKite\n", encoding="utf-8")
    return path
