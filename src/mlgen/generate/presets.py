"""Presets: the sampling settings each known model family is meant to run with.

One small JSON file per family in ``presets/`` (size, steps, guidance, scheduler, and which model
ids it matches). A preset fills only the settings the user left unset: flags, environment and
config file always win.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from mlgen.config import GenerateConfig
from mlgen.errors import MlgenError

PRESET_FIELDS = ("size", "steps", "guidance", "scheduler")


@cache
def presets() -> dict[str, dict[str, Any]]:
    """Every preset by name (the file's stem)."""
    folder = resources.files("mlgen.generate") / "presets"
    return {
        Path(entry.name).stem: json.loads(entry.read_text(encoding="utf-8"))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".json")
    }


def _pipeline_class(model: str) -> str | None:
    """The pipeline class a local folder declares (hub ids: None, matched by name only)."""
    index = Path(model) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    return None


def preset_for(model: str) -> str:
    """The preset a model id or folder runs with: exact name, else the longest id pattern, else its class."""
    table = presets()
    for name, preset in table.items():
        if model in preset.get("names", ()):
            return name
    lowered = model.lower()
    hits = [(len(pattern), name) for name, p in table.items() for pattern in p.get("match", ()) if pattern in lowered]
    if hits:
        return max(hits)[1]
    pipeline = _pipeline_class(model)
    for name, preset in table.items():
        if pipeline and preset.get("pipeline") == pipeline:
            return name
    return "default"


def apply_preset(config: GenerateConfig) -> GenerateConfig:
    """``config`` with its unset (None) sampling settings taken from its preset."""
    name = config.preset or preset_for(config.model)
    if name not in presets():
        raise MlgenError(f"unknown preset '{name}': choose one of {', '.join(sorted(presets()))} (see `mlgen models`)")
    preset = presets()[name]
    filled = {f: preset.get(f) for f in PRESET_FIELDS if getattr(config, f) is None}
    return dataclasses.replace(config, preset=name, **filled)
