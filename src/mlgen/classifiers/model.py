"""The multi-label classifier: a frozen CLIP image encoder (optionally fused) and a trainable head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from mlgen.classifiers.features import label_embeddings
from mlgen.classifiers.fusion import add_fusion, set_fusion_train
from mlgen.classifiers.heads import CPRFLHead, DualCoOpHead, LinearHead

HEADS = ("linear", "dualcoop", "cprfl")


class _TokenTap:
    """Keeps the output of the encoder's last feature stage (ViT tokens or the ResNet map) as [N, T, D]."""

    def __init__(self, visual: nn.Module) -> None:
        self.value: Tensor | None = None
        self.vit = hasattr(visual, "transformer")
        target = visual.transformer if self.vit else visual.layer4
        self.batch_first = getattr(target, "batch_first", True)
        target.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self.vit:
            tokens = output if self.batch_first else output.transpose(0, 1)
            self.value = tokens[:, 1:]  # patch tokens (the class token left out)
        else:
            self.value = output.flatten(2).transpose(1, 2)  # [N, HW, C]


class MultiLabelClassifier(nn.Module):
    def __init__(self, clip_model, head: nn.Module, head_name: str, fusion: bool, classes: list[str]) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.head = head
        self.head_name = head_name
        self.fusion = fusion
        self.classes = list(classes)
        self.cacheable = not fusion
        self.needs_tokens = head_name == "cprfl"
        self._tap = _TokenTap(self.visual)
        if not fusion:
            for p in self.visual.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> MultiLabelClassifier:
        super().train(mode)
        set_fusion_train(self.visual, mode) if self.fusion else self.visual.eval()
        return self

    def _encode(self, pixels: Tensor) -> dict[str, Tensor]:
        pixels = pixels.to(next(self.visual.parameters()).dtype)
        features = {"pooled": self.visual(pixels)}
        if self.needs_tokens:
            features["tokens"] = self._tap.value
        return features

    def frozen_features(self, pixels: Tensor) -> dict[str, Tensor]:
        """What a feature cache stores (only meaningful when ``cacheable``): ``pooled`` and, for CPRFL, ``tokens``."""
        with torch.no_grad():
            return {k: v.float() for k, v in self._encode(pixels).items()}

    def forward_features(self, features: dict[str, Tensor]) -> Tensor:
        if self.head_name == "linear":
            return self.head(features["pooled"])
        return self.head(features)

    def forward(self, pixels: Tensor) -> Tensor:
        if self.fusion:
            return self.forward_features(self._encode(pixels))
        return self.forward_features(self.frozen_features(pixels))

    def trainable_state(self) -> dict[str, Tensor]:
        """Everything that trains (head + fusion) plus the head's buffers: what save/load need."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        names |= {f"head.{n}" for n, _ in self.head.named_buffers()}
        names |= {n for n, _ in self.named_buffers() if ".branch." in n}  # fusion BatchNorm statistics
        return {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items() if n in names}


def build_classifier(
    clip_model, tokenizer, classes: list[str], head: str = "linear", fusion: bool = False, device=None
) -> MultiLabelClassifier:
    """A classifier over ``classes`` on ``clip_model``'s image encoder (frozen; fusion modules train if asked)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: use one of {HEADS}")
    device = torch.device(device or "cpu")
    clip_model = clip_model.to(device).eval()
    for p in clip_model.parameters():
        p.requires_grad_(False)
    text = label_embeddings(clip_model, tokenizer, classes, device).to(device)
    dim = clip_model.visual.output_dim
    if head == "linear":
        module: nn.Module = LinearHead(dim, len(classes), class_embeddings=text)
    elif head == "dualcoop":
        module = DualCoOpHead(clip_model, tokenizer, classes)
    else:
        visual = clip_model.visual
        visual_dim = (
            visual.transformer.width if hasattr(visual, "transformer") else visual.layer4[-1].conv3.out_channels
        )
        module = CPRFLHead(text, visual_dim, dim=min(512, max(64, dim)))
    if fusion:
        add_fusion(clip_model.visual)
    return MultiLabelClassifier(clip_model, module, head, fusion, classes).to(device)


def save_classifier(model: MultiLabelClassifier, folder: Path) -> None:
    """``folder/classifier.safetensors`` (trainable + head buffers) and ``classifier.json`` (how to rebuild)."""
    from safetensors.torch import save_file

    from mlgen.paths import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "classifier.safetensors.tmp"
    save_file(model.trainable_state(), tmp)
    tmp.replace(folder / "classifier.safetensors")
    write_json_atomic(
        folder / "classifier.json", {"head": model.head_name, "fusion": model.fusion, "classes": model.classes}
    )


def load_classifier(clip_model, tokenizer, folder: Path, device=None) -> MultiLabelClassifier:
    from safetensors.torch import load_file

    meta = json.loads((folder / "classifier.json").read_text(encoding="utf-8"))
    model = build_classifier(clip_model, tokenizer, meta["classes"], meta["head"], meta["fusion"], device)
    state = load_file(folder / "classifier.safetensors", device=str(next(model.parameters()).device))
    missing = set(model.trainable_state()) - set(state)
    if missing:
        raise ValueError(f"{folder}: classifier weights lack {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model.eval()
