"""Training checkpoints: trainable weights (safetensors), optimizer, LR scheduler and RNG states.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` built under a temporary name and renamed
into place, so a folder with that name is always complete. States are plain tensors and dicts
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mlgen.errors import MlgenError

PREFIX = "step-"


@dataclass
class TrainState:
    """What the loop carries between steps besides the tensors."""

    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)  # the rows of log.csv so far
    window: list[list[float]] = field(default_factory=list)  # (loss, pass share) of each step since the last row


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def remove_stale(folder: Path) -> None:
    """Temporary checkpoint folders of a killed run (never complete)."""
    if folder.is_dir():
        for tmp in folder.glob(f".{PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)


def save(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and delete all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder))
    tmp.chmod(0o755)
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"rng": rng_state(), "scaler": scaler.state_dict()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=1), encoding="utf-8")
        if final.exists():  # the same step again (a rerun after a crash right after saving)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))


def load(
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    device: torch.device,
) -> dict[str, Any]:
    """Restore everything ``save`` wrote; returns the checkpoint's metadata."""
    weights = load_file(str(checkpoint / "trainable.safetensors"))
    expected = set(trainable_state(model))
    if set(weights) != expected:
        raise MlgenError(f"checkpoint {checkpoint} holds other trainable weights (LoRA vs. full text encoder?)")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    states = torch.load(checkpoint / "rng.pt", weights_only=True)
    set_rng_state(states["rng"])
    if states["scaler"] and scaler.is_enabled():  # fp16 loss scaling (empty when it was off)
        scaler.load_state_dict(states["scaler"])
    return read_meta(checkpoint)
