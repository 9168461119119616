"""The multi-label classifier: a frozen CLIP image encoder (optionally fused) and a trainable head."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlgen.classifiers.features import label_embeddings
from mlgen.classifiers.fusion import add_fusion, set_fusion_train
from mlgen.classifiers.heads import CPRFLHead, DualCoOpHead, LinearHead

HEADS = ("linear", "dualcoop", "cprfl")


class _TokenTap:
    """Keeps the output of the encoder's last feature stage: ``value`` [N, T, width] (ViT patch tokens or the
    ResNet map, what CPRFL reads) and ``dense`` [N, R, D] (the attention-pool-free embedding of every region,
    what DualCoOp's dense scoring reads; computed only when asked)."""

    def __init__(self, visual: nn.Module, dense: bool = False) -> None:
        self.value: Tensor | None = None
        self.dense: Tensor | None = None
        self.want_dense = dense
        self.visual = [visual]  # a list: not a submodule
        self.vit = hasattr(visual, "transformer")
        target = visual.transformer if self.vit else visual.layer4
        self.batch_first = getattr(target, "batch_first", True)
        target.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self.vit:
            tokens = output if self.batch_first else output.transpose(0, 1)
            self.value = tokens[:, 1:]  # patch tokens (the class token left out)
            self.dense = _vit_dense(self.visual[0], tokens) if self.want_dense else None
        else:
            self.value = output.flatten(2).transpose(1, 2)  # [N, HW, C]
            self.dense = _resnet_dense(self.visual[0].attnpool, output) if self.want_dense else None


def _vit_dense(visual: nn.Module, tokens: Tensor) -> Tensor:
    """Every token (class token first, then the patches) through ``ln_post`` and ``proj``: [N, 1 + HW, D]."""
    x = visual.ln_post(tokens)
    return x @ visual.proj if visual.proj is not None else x


def _resnet_dense(pool: nn.Module, feature_map: Tensor) -> Tensor:
    """DenseCLIP/DualCoOp's attention-pool-free map: [mean; positions] + positional embedding (resized to the
    map), through the attention pool's value and output projections only: [N, 1 + HW, D]."""
    _, channels, height, width = feature_map.shape
    x = feature_map.flatten(2).transpose(1, 2)  # [N, HW, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
    position = pool.positional_embedding.to(x.dtype)
    if position.shape[0] != height * width + 1:
        side = round((position.shape[0] - 1) ** 0.5)
        grid = position[1:].T.reshape(1, channels, side, side)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        position = torch.cat([position[:1], grid.reshape(channels, -1).T])
    x = F.linear(x + position, pool.v_proj.weight, pool.v_proj.bias)
    return F.linear(x, pool.c_proj.weight, pool.c_proj.bias)


@dataclass(frozen=True)
class HeadOptions:
    """How a head is built (ClassifierConfig fields of the same name; saved in config.json)."""

    class_specific_context: bool = False  # dualcoop: one context pair per class instead of the shared one
    dualcoop_scoring: str = "dense"  # dualcoop: dense (official region aggregation) or pooled
    # dualcoop: learned context tokens. Official 64; a text tower trained on short captions only (the toy CLIPs)
    # has untrained position embeddings past ~12 tokens and learns nothing with a long context (use 4 there).
    prompt_context: int = 64
    cprfl_recipe: str = "official"  # cprfl: official (raw text, AdamW 1e-5, OneCycle, EMA) or mlgen (SGD)

    @classmethod
    def of(cls, config: Any) -> HeadOptions:
        """The options of a ClassifierConfig (or any object with those attributes; missing ones: default)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})


class MultiLabelClassifier(nn.Module):
    def __init__(
        self,
        clip_model,
        head: nn.Module,
        head_name: str,
        fusion: bool,
        classes: list[str],
        options: HeadOptions | None = None,
    ) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.head = head
        self.head_name = head_name
        self.fusion = fusion
        self.classes = list(classes)
        self.head_init = "text"
        self.options = options or HeadOptions()
        self.cacheable = not fusion
        self.needs_tokens = head_name == "cprfl"
        self.needs_dense = head_name == "dualcoop" and self.options.dualcoop_scoring == "dense"
        self._tap = _TokenTap(self.visual, dense=self.needs_dense)
        if not fusion:
            for p in self.visual.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> MultiLabelClassifier:
        """Only the head follows ``mode``: the encoder, fusion modules included, stays in eval (the official
        trainer switches only the prompt learner to train; see fusion.set_fusion_train)."""
        super().train(mode)
        set_fusion_train(self.visual, mode) if self.fusion else self.visual.eval()
        return self

    def _encode(self, pixels: Tensor) -> dict[str, Tensor]:
        pixels = pixels.to(next(self.visual.parameters()).dtype)
        features = {"pooled": self.visual(pixels)}
        if self.needs_tokens:
            features["tokens"] = self._tap.value
        if self.needs_dense:
            features["dense"] = self._tap.dense
        return features

    def frozen_features(self, pixels: Tensor) -> dict[str, Tensor]:
        """What a feature cache stores (only meaningful when ``cacheable``): ``pooled`` and, for CPRFL, ``tokens``,
        for DualCoOp's dense scoring ``dense`` (the projected region map)."""
        with torch.no_grad():
            return {k: v.float() for k, v in self._encode(pixels).items()}

    def forward_features(self, features: dict[str, Tensor], columns: Tensor | None = None) -> Tensor:
        """Logits [N, C]; with ``columns`` (a boolean mask over the classes) only those, [N, columns]."""
        if self.head_name == "dualcoop":  # its cost is per class: only the scored ones are computed
            return self.head(features, columns)
        logits = self.head(features["pooled"]) if self.head_name == "linear" else self.head(features)
        return logits if columns is None else logits[..., columns.to(logits.device)]

    def forward(self, pixels: Tensor, columns: Tensor | None = None) -> Tensor:
        if self.fusion:
            return self.forward_features(self._encode(pixels), columns)
        return self.forward_features(self.frozen_features(pixels), columns)

    def trainable_state(self) -> dict[str, Tensor]:
        """Everything that trains (head + fusion) plus the head's buffers: what save/load need."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        names |= {f"head.{n}" for n, _ in self.head.named_buffers()}
        names |= {n for n, _ in self.named_buffers() if ".branch." in n}  # fusion BatchNorm statistics
        return {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items() if n in names}


def _prompt_context(clip_model, tokenizer, classes: list[str], wanted: int = 64) -> int:
    """DualCoOp's learned context length: 64 (the paper), or less where the text encoder's window is shorter
    (start, context, the longest class name, '.', end must fit)."""
    name_tokens = max(int((tokenizer([name]) != 0).sum()) - 2 for name in classes)
    return max(1, min(wanted, int(clip_model.context_length) - name_tokens - 3))


def build_classifier(
    clip_model,
    tokenizer,
    classes: list[str],
    head: str = "linear",
    fusion: bool = False,
    device=None,
    head_init: str = "text",
    seed: int = 0,
    options: HeadOptions | None = None,
) -> MultiLabelClassifier:
    """A classifier over ``classes`` on ``clip_model``'s image encoder (frozen; fusion modules train if asked).

    ``head_init="random"`` starts the linear head from random weights instead of CLIP's text embeddings;
    ``options`` (:class:`HeadOptions`, e.g. ``HeadOptions.of(classifier_config)``) shape the prompt heads.
    """
    options = options or HeadOptions()
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: use one of {HEADS}")
    device = torch.device(device or "cpu")
    clip_model = clip_model.to(device).eval()
    for p in clip_model.parameters():
        p.requires_grad_(False)
    dim = clip_model.visual.output_dim
    if head == "linear":
        generator = torch.Generator().manual_seed(seed)
        init = label_embeddings(clip_model, tokenizer, classes, device).cpu() if head_init == "text" else None
        module: nn.Module = LinearHead(dim, len(classes), class_embeddings=init, generator=generator)
    elif head == "dualcoop":
        module = DualCoOpHead(
            clip_model,
            tokenizer,
            classes,
            context_length=_prompt_context(clip_model, tokenizer, classes, options.prompt_context),
            class_specific=options.class_specific_context,
            scoring=options.dualcoop_scoring,
            generator=torch.Generator().manual_seed(seed),
        )
    else:
        text = label_embeddings(clip_model, tokenizer, classes, device).to(device)
        module = _cprfl_head(clip_model, tokenizer, classes, text, options.cprfl_recipe, device)
    if fusion:
        add_fusion(clip_model.visual)
    model = MultiLabelClassifier(clip_model, module, head, fusion, classes, options).to(device)
    model.head_init = head_init
    return model


def head_options(config: Any) -> dict[str, HeadOptions]:
    """``build_classifier(..., **head_options(classifier_config))``: the stage's one hook for head options."""
    return {"options": HeadOptions.of(config)}


CPRFL_RECIPES = ("mlgen", "official")
CPRFL_MAX_DIM = 2048  # the official d (ResNet-101's width); wider encoders are capped here


def _cprfl_head(clip_model, tokenizer, classes: list[str], text: Tensor, recipe: str, device) -> CPRFLHead:
    """mlgen: normalised text embeddings, d = min(512, CLIP dim), d/8 per attention head, MLP 4d. official:
    raw (unnormalised) text features, d = the visual token width (capped at 2048), 512 per attention head, MLP
    2048 (each capped at d or 4d for small encoders)."""
    visual = clip_model.visual
    visual_dim = visual.transformer.width if hasattr(visual, "transformer") else visual.layer4[-1].conv3.out_channels
    if recipe == "mlgen":
        return CPRFLHead(text, visual_dim, dim=min(512, max(64, clip_model.visual.output_dim)))
    if recipe != "official":
        raise ValueError(f"unknown CPRFL recipe {recipe!r}: use one of {CPRFL_RECIPES}")
    with torch.no_grad():
        raw = clip_model.encode_text(tokenizer([f"a photo of a {c}." for c in classes]).to(device)).float()
    dim = min(visual_dim, CPRFL_MAX_DIM)
    return CPRFLHead(raw, visual_dim, dim=dim, dim_head=min(512, dim), mlp_dim=min(2048, 4 * dim))


WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_classifier(model: MultiLabelClassifier, folder: Path, **extra: Any) -> None:
    """``folder/model.safetensors`` (trainable + head buffers) and ``config.json`` (how to rebuild it, plus
    ``extra``: the backbone name ``clip``, thresholds...). The one save path of every command."""
    from safetensors.torch import save_file

    from mlgen.paths import write_atomic, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    state = model.trainable_state()
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    config = {
        **extra,
        "head": model.head_name,
        "fusion": model.fusion,
        "head_init": model.head_init,
        "head_options": asdict(model.options),
        "classes": model.classes,
        "feature_dim": int(model.visual.output_dim),
    }
    write_json_atomic(folder / CONFIG, config)


def read_config(folder: Path) -> dict[str, Any]:
    from mlgen.errors import MlgenError

    try:
        return json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MlgenError(f"cannot read the classifier's {folder / CONFIG}: {err}") from None


def load_classifier(clip_model, tokenizer, folder: Path, device=None) -> MultiLabelClassifier:
    """The classifier saved in ``folder`` on ``clip_model`` (the same backbone it was trained on)."""
    from safetensors.torch import load_file

    meta = read_config(folder)
    options = HeadOptions(**meta.get("head_options", {}))
    head_init = meta.get("head_init", "text")
    model = build_classifier(
        clip_model, tokenizer, meta["classes"], meta["head"], meta["fusion"], device, head_init, options=options
    )
    state = load_file(folder / WEIGHTS, device=str(next(model.parameters()).device))
    missing = set(model.trainable_state()) - set(state)
    if missing:
        raise ValueError(f"{folder}: classifier weights lack {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def load_clip(name: str, device: torch.device):
    """(open_clip model in float32, eval; preprocess; tokenizer): the classifier trains and scores in fp32."""
    import open_clip

    from mlgen.errors import MlgenError
    from mlgen.models.registry import open_clip_name, warn_random_weights

    model_name, pretrained = open_clip_name(name)
    warn_random_weights(name, "clip")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except (RuntimeError, OSError, ValueError) as err:
        raise MlgenError(f"cannot load CLIP model '{name}': {str(err).splitlines()[0][:200]}") from None
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model_name)


def load_trained(folder: Path, device: torch.device | None = None):
    """(classifier, preprocess, config) from a folder written by :func:`save_classifier`."""
    from mlgen.errors import MlgenError

    config = read_config(folder)
    if not (folder / WEIGHTS).is_file():
        raise MlgenError(f"{folder / WEIGHTS} is missing: train the classifier again (mlgen train-classifier)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clip_model, preprocess, tokenizer = load_clip(config["clip"], device)
    try:
        model = load_classifier(clip_model, tokenizer, folder, device)
    except (ValueError, RuntimeError) as err:
        raise MlgenError(f"{folder}: the weights do not fit its config.json ({str(err).splitlines()[0]})") from None
    return model, preprocess, config


def predict_images(model: MultiLabelClassifier, preprocess, images: list[bytes], batch_size: int = 64) -> Tensor:
    """Sigmoid probabilities [N, C] (float32, CPU) of encoded images (raises OSError for a non-image)."""
    from PIL import Image

    device = next(model.parameters()).device
    chunks = []
    model.eval()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch]).to(device)
        with torch.no_grad():
            chunks.append(torch.sigmoid(model(pixels).float()).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, len(model.classes))
