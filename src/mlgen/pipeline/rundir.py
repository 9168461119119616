"""The run directory: the on-disk contract every stage reads and writes (design.md, section 2)."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mlgen.errors import MlgenError
from mlgen.labels import parse_labels
from mlgen.paths import write_text_atomic

SUCCESS = "_SUCCESS.json"
PLAN = "plan.json"

# Which command makes each stage folder, for "run X first" messages.
STAGE_COMMANDS = {
    "prompts": "mlgen prompts --classes FILE",
    "raw": "mlgen generate",
    "filtered": "mlgen filter",
    "classifier": "mlgen train-classifier",
}


def stats_path(stage_folder: Path, shard: int) -> Path:
    """A shard's stats file: written last, so the shard is done exactly when it exists."""
    return stage_folder / f"{shard:05d}_stats.json"


class RunDir:
    """Paths and small files of one run; shard files are handled by :mod:`mlgen.shards`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def classes_file(self) -> Path:
        return self.root / "classes.txt"

    def classes(self) -> list[str]:
        if not self.classes_file.is_file():
            raise MlgenError(f"{self.root} has no classes.txt: pass --classes FILE")
        return parse_labels(self.classes_file.read_text(encoding="utf-8"), str(self.classes_file))

    def write_classes(self, labels: list[str]) -> None:
        write_text_atomic(self.classes_file, "".join(f"{label}\n" for label in labels))

    def success(self, stage: str) -> dict[str, Any] | None:
        """The stage's ``_SUCCESS.json`` marker, or None when the stage has not finished."""
        marker = self.stage_dir(stage) / SUCCESS
        return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None

    def require(self, stage: str) -> dict[str, Any]:
        marker = self.success(stage)
        if marker is None:
            raise MlgenError(f"stage '{stage}' has not finished in {self.root}: run `{STAGE_COMMANDS[stage]}` first")
        return marker

    @contextlib.contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold the stage's lock: a second mlgen process on the same stage stops instead of racing.

        An OS file lock, so a killed process releases it with nothing to clean up.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{stage}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MlgenError(f"another mlgen process is running stage '{stage}' in {self.root}") from None
            yield

    def recorded_config(self, section: str) -> dict[str, Any]:
        """One section of ``config.yaml`` as recorded by the last run of that stage (``{}`` if none)."""
        path = self.root / "config.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        return dict((data or {}).get(section) or {})

    def record_config(self, section: str, values: dict[str, Any]) -> None:
        """Store a stage's resolved settings as one section of ``config.yaml``."""
        path = self.root / "config.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data = data or {}
        data[section] = values
        write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
