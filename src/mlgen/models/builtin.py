"""The table of built-in trained models shipped in the package: one place that the model registry (which
resolves names) and the toy world (which trains and exports them) both read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent.parent / "world" / "weights"


@dataclass(frozen=True)
class BuiltinModel:
    name: str  # what users pass to --clip / --model
    kind: str  # "clip" (open_clip local-dir layout) or "diffusion" (diffusers pipeline folder)
    folder: Path
    world: str  # the toy world it was trained on
    trained_by: str  # the command that makes it

    @property
    def marker(self) -> Path:
        return self.folder / ("open_clip_model.safetensors" if self.kind == "clip" else "model_index.json")


BUILTIN_MODELS = (
    BuiltinModel("toy", "clip", WEIGHTS / "toy-clip", "classic", "mlgen world train clip"),
    BuiltinModel("toy", "diffusion", WEIGHTS / "toy-sd", "classic", "mlgen world train unet"),
    BuiltinModel(
        "toy-headroom", "clip", WEIGHTS / "toy-headroom-clip", "headroom", "mlgen world train clip --world headroom"
    ),
    BuiltinModel(  # captions name the rare shapes by their own word part of the time; its generator: toy-headroom
        "toy-named",
        "clip",
        WEIGHTS / "toy-named-clip",
        "headroom",
        "mlgen world train clip --world headroom --steps 300 --lr 1e-3 --name-rate 0.05 --confusion 0.1",
    ),
    BuiltinModel(  # the experiment's and the demo's generator: toy-headroom trained on, with a headroom decoder
        "toy-headroom-2",
        "diffusion",
        WEIGHTS / "toy-headroom-2-sd",
        "headroom",
        "mlgen world train unet --world headroom --init toy-headroom --steps 4500, then mlgen world train vae "
        "--world headroom --init P --decoder-only --steps 600",
    ),
    BuiltinModel(  # the first headroom generator: its VAE, kept from the classic world, draws classic colours
        "toy-headroom", "diffusion", WEIGHTS / "toy-headroom-sd", "headroom", "mlgen world train unet --world headroom"
    ),
)


def builtin(name: str, kind: str) -> BuiltinModel | None:
    """The built-in model of that name and kind, or None."""
    return next((m for m in BUILTIN_MODELS if m.name == name and m.kind == kind), None)


def builtin_for_world(world: str, kind: str) -> BuiltinModel:
    """The world's first model of that kind (the headroom world's clip: toy-headroom, not toy-named)."""
    return next(m for m in BUILTIN_MODELS if m.world == world and m.kind == kind)


def weights_digest(model: BuiltinModel) -> str:
    """A short sha256 of every file in the model's folder: new weights shipped under an old name differ."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model.folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model.folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def model_identity(name: str, kind: str) -> str:
    """What a model name stands for in recorded settings: a built-in model's name with its weights' digest
    (``toy-headroom-2 (weights 1a2b...)``); any other name as given (a folder or hub id is the user's to keep)."""
    model = builtin(name, kind)
    if model is None or not model.marker.is_file():
        return name
    return f"{name} (weights {weights_digest(model)})"
