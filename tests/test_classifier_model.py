"""Classifier heads, fusion and losses on tiny real open_clip models: shapes, gradients, learning, save/load."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mlgen.classifiers.losses import make_loss
from mlgen.classifiers.model import build_classifier, load_classifier, save_classifier
from mlgen.models.registry import open_clip_name

CLASSES = ["circle", "square", "triangle"]


def _clip(name: str):
    model_name, pretrained = open_clip_name(name)
    model = open_clip.create_model(model_name, pretrained=pretrained)
    return model, open_clip.get_tokenizer(model_name)


@pytest.mark.parametrize(
    ("name", "head", "fusion", "loss"),
    [
        ("tiny", "linear", False, "bce"),
        ("tiny", "dualcoop", False, "asl"),
        ("tiny", "cprfl", True, "asl"),
        ("tiny-resnet", "cprfl", False, "mlcd"),
        ("tiny-resnet", "linear", True, "asl"),
    ],
)
def test_head_trains_only_its_params_learns_and_reloads(tmp_path, name, head, fusion, loss) -> None:
    torch.manual_seed(0)
    clip_model, tokenizer = _clip(name)
    frozen = {n: p.detach().clone() for n, p in clip_model.named_parameters()}
    model = build_classifier(clip_model, tokenizer, CLASSES, head=head, fusion=fusion, device="cpu")
    assert model.cacheable is (not fusion)
    pixels = torch.randn(4, 3, 64, 64)
    # random-weight CLIP gives near-identical embeddings: a label set shared by the batch is what is learnable
    targets = torch.tensor([[1, 0, 1]]).repeat(4, 1)
    features = model.frozen_features(pixels)
    assert features["pooled"].shape == (4, 64)
    if head == "cprfl":
        assert features["tokens"].ndim == 3 and features["tokens"].shape[0] == 4
    assert model(pixels).shape == (4, 3)

    loss_fn = make_loss(loss, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2 if head == "linear" else 1e-3)
    model.train()
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        value = loss_fn(model(pixels) if fusion else model.forward_features(features), targets)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert sum(losses[-3:]) / 3 < losses[0]  # CPRFL's dropout makes single steps noisy
    assert all(p.grad is not None for p in trainable)
    trained = {id(p) for p in trainable}
    for n, p in clip_model.named_parameters():  # the CLIP weights never change (fusion wraps ".block"/".conv")
        if id(p) not in trained:
            assert torch.equal(p, frozen[n.replace(".block.", ".").replace(".conv.", ".")]), n

    model.eval()
    with torch.no_grad():
        expected = model(pixels)
    save_classifier(model, tmp_path / "clf")
    clip_again, tokenizer = _clip(name)
    reloaded = load_classifier(clip_again, tokenizer, tmp_path / "clf")
    with torch.no_grad():
        assert torch.allclose(reloaded(pixels), expected, atol=1e-6)
