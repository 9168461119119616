"""``RUN/text_encoder/``: the fine-tuned text encoder, and how the generate stage loads it.

Two layouts: the whole text encoder (transformers ``save_pretrained``: config.json +
model.safetensors) or, after ``--lora-rank``, the peft adapter alone (adapter_config.json +
adapter_model.safetensors), applied to the base model's text encoder when loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mlgen.errors import MlgenError

INFO = "mlgen_finetune.json"  # base model, settings hash, steps: what this text encoder is
ADAPTER_CONFIG = "adapter_config.json"


def save_text_encoder(model: torch.nn.Module, final: Path, info: dict[str, Any]) -> None:
    """Write ``final`` as a whole: built under a temporary name, then renamed into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
        (tmp / INFO).write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
        tmp.chmod(0o755)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_output(final: Path) -> None:
    """Folders a run killed inside :func:`save_text_encoder` left beside ``final`` (a rerun writes it anew)."""
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def is_lora(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_text_encoder(folder: Path, base: torch.nn.Module) -> torch.nn.Module:
    """The fine-tuned text encoder in ``folder`` (either layout), on ``base``'s device and dtype.

    ``base`` is the diffusion model's own text encoder: a LoRA folder is applied to it and merged
    (``base`` is changed in place); a full folder replaces it.
    """
    folder = Path(folder)
    if not folder.is_dir() or not ((folder / "config.json").is_file() or is_lora(folder)):
        raise MlgenError(f"{folder} holds no fine-tuned text encoder (no config.json or {ADAPTER_CONFIG})")
    if is_lora(folder):
        from peft import PeftModel

        return PeftModel.from_pretrained(base, folder).merge_and_unload().eval()
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(folder, dtype=base.dtype)
    return model.to(base.device).eval()


def text_encoder_hash(folder: Path) -> str:
    """A short hash of the folder's files (names and bytes): which text encoder made the images."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
