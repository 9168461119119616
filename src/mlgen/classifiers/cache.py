"""The classifier's on-disk cache of frozen image features (float16), keyed by model and image.

When the trainable part sits on top of a frozen encoder (no fusion), the encoder's outputs never change:
computed once they are stored under ``RUN/cache/classifier-features/<model key>/`` in safetensors chunks, each
listing the sha256 of the images it holds. Later epochs, reruns, the no-filter ablation (the same images) and
other heads on the same backbone read them instead of running the encoder.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlgen.classifiers.model import MultiLabelClassifier
from mlgen.paths import write_atomic

CHUNK = 512  # images per cache file


def image_key(image: bytes) -> str:
    return hashlib.sha256(image).hexdigest()


def model_key(clip: str, model: MultiLabelClassifier) -> str:
    """The backbone's name, its weights (hashed) and what is stored (pooled, + tokens for CPRFL, + the dense
    region map for DualCoOp's dense scoring: a key of its own, so a pooled-only chunk never serves it)."""
    stored = f"{clip}\ntokens={model.needs_tokens}\n" + ("dense=True\n" if model.needs_dense else "")
    digest = hashlib.sha256(stored.encode())
    for name, tensor in model.visual.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def pixel_batches(images: Iterable[bytes], preprocess, batch_size: int) -> Iterator[tuple[list[bytes], Tensor]]:
    """(encoded images, preprocessed pixels) in batches: images decoded only as they are needed."""
    batch: list[bytes] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield batch, torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch])
            batch = []
    if batch:
        yield batch, torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch])


class FeatureCache:
    def __init__(self, run_root: Path, clip: str, model: MultiLabelClassifier) -> None:
        self.folder = run_root / "cache" / "classifier-features" / model_key(clip, model)
        self.model = model
        self.hits = self.misses = 0

    def _load(self) -> dict[str, dict[str, Tensor]]:
        """image key -> its features (float16 rows), from every chunk file."""
        rows: dict[str, dict[str, Tensor]] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            for i, key in enumerate(keys):
                rows[key] = {name: t[i] for name, t in tensors.items()}
        return rows

    def _save(self, keys: list[str], features: list[dict[str, Tensor]]) -> None:
        stacked = {name: torch.stack([f[name] for f in features]).contiguous() for name in features[0]}
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        meta = {"keys": json.dumps(keys)}
        write_atomic(self.folder / f"{name}.safetensors", lambda tmp: save_file(stacked, str(tmp), metadata=meta))

    def features(self, images: Iterable[bytes], preprocess, batch_size: int = 64, tag: str = "") -> dict[str, Tensor]:
        """Frozen features of ``images`` in order (float16, CPU): cached ones read, the others computed,
        stored and returned. Images stream through in batches; only their features stay in memory.
        ``tag`` names the view ``preprocess`` makes (e.g. ``squash``, ``aug3``): it is part of every key."""
        self.folder.mkdir(parents=True, exist_ok=True)
        known = self._load()
        device = next(self.model.parameters()).device
        order: list[str] = []
        new_keys: list[str] = []
        reserved: set[str] = set()
        new_rows: list[dict[str, Tensor]] = []

        def missing() -> Iterator[bytes]:
            for image in images:
                key = image_key(image) + (f"#{tag}" if tag else "")
                order.append(key)
                if key in known or key in reserved:
                    self.hits += 1
                    continue
                self.misses += 1
                new_keys.append(key)  # reserved now; its row comes with its batch
                reserved.add(key)
                yield image

        done = 0
        for _batch, pixels in pixel_batches(missing(), preprocess, batch_size):
            computed = self.model.frozen_features(pixels.to(device))
            for i in range(pixels.shape[0]):
                new_rows.append({k: v[i].to(torch.float16).cpu() for k, v in computed.items()})
            if len(new_rows) - done >= CHUNK:
                self._save(new_keys[done : len(new_rows)], new_rows[done:])
                done = len(new_rows)
        if len(new_rows) > done:
            self._save(new_keys[done : len(new_rows)], new_rows[done:])
        known.update(zip(new_keys, new_rows, strict=True))
        if not order:
            return {}
        return {name: torch.stack([known[key][name] for key in order]) for name in known[order[0]]}
