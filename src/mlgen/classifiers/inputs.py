"""Checks on a zero-shot evaluation's inputs that need no model: the command fails in a second, not after
torch and CLIP have loaded (this module imports neither)."""

from __future__ import annotations

from pathlib import Path

from mlgen.errors import MlgenError
from mlgen.pipeline.rundir import RunDir

ZERO_SHOT_METHODS = ("clip", "s3")


def synonyms_table(run: RunDir) -> Path:
    """The prompt stage's synonyms (the S^3 point sets); a clear error when the run has none."""
    path = run.stage_dir("prompts") / "synonyms.parquet"
    if not path.is_file():
        raise MlgenError(f"--zero-shot s3 needs the prompt stage's synonyms: {path} is missing (run `mlgen prompts`)")
    return path


def check_zero_shot_inputs(run: RunDir, data: Path, method: str) -> None:
    if method not in ZERO_SHOT_METHODS:
        raise MlgenError(f"--zero-shot must be clip or s3, not {method!r}")
    from mlgen.classifiers.benchmarks import data_exists  # numpy only: still no torch

    if not data_exists(data):
        raise MlgenError(f"evaluation data not found: {data}")
    if method == "s3":
        synonyms_table(run)


def zero_shot_aliases(run: RunDir, data: Path, path: Path) -> dict[str, list[str]]:
    """``--label-aliases FILE`` of a zero-shot evaluation, checked against the labels it scores: the run's, or a
    whole benchmark's own (``coco-zsl:ROOT``)."""
    from mlgen.classifiers.benchmarks import open_split, parse_spec
    from mlgen.labels import read_aliases

    spec = parse_spec(data)
    classes = open_split(spec, "gzsl-test").classes if spec is not None and spec.split is None else run.classes()
    return read_aliases(path, classes)
