"""Classifier heads, fusion and losses on tiny real open_clip models: shapes, gradients, learning, save/load."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mlgen.classifiers.losses import make_loss
from mlgen.classifiers.model import HeadOptions, build_classifier, load_classifier, save_classifier
from mlgen.models.registry import open_clip_name

CLASSES = ["circle", "square", "triangle"]


def _clip(name: str):
    model_name, pretrained = open_clip_name(name)
    model = open_clip.create_model(model_name, pretrained=pretrained)
    return model, open_clip.get_tokenizer(model_name)


# Two distinct images (black, white; each twice) with distinct labels: a model that learned a bias only
# (the same scores for every image) cannot rank each label's image above the other one.
PER_CLASS = [[1, 0, 1], [0, 1, 0]]  # which label depends on the image
PER_IMAGE = [[1, 1, 1], [0, 0, 0]]  # whether any label: all a shared DualCoOp context can learn on a random text tower


@pytest.mark.parametrize(
    ("name", "head", "fusion", "loss", "options", "pattern", "lr", "steps"),
    [
        ("tiny", "linear", False, "bce", {}, PER_CLASS, 1e-2, 10),
        ("tiny", "dualcoop", False, "asl", {"class_specific_context": True}, PER_CLASS, 1e-3, 10),
        ("tiny", "dualcoop", False, "asl", {}, PER_IMAGE, 1e-3, 10),
        ("tiny", "cprfl", True, "asl", {}, PER_CLASS, 1e-3, 10),
        # the random-weight ResNet's features of the two images are 0.998 alike: smaller steps, more of them
        ("tiny-resnet", "cprfl", False, "mlcd", {}, PER_CLASS, 1e-4, 30),
        ("tiny-resnet", "linear", True, "asl", {}, PER_CLASS, 1e-2, 30),
    ],
)
def test_head_trains_only_its_params_learns_and_reloads(
    tmp_path, name, head, fusion, loss, options, pattern, lr, steps
) -> None:
    torch.manual_seed(0)
    clip_model, tokenizer = _clip(name)
    frozen = {n: p.detach().clone() for n, p in clip_model.named_parameters()}
    model = build_classifier(
        clip_model, tokenizer, CLASSES, head=head, fusion=fusion, device="cpu", options=HeadOptions(**options)
    )
    assert model.cacheable is (not fusion)
    pixels = torch.cat([torch.full((1, 3, 64, 64), -1.5), torch.full((1, 3, 64, 64), 1.5)]).repeat(2, 1, 1, 1)
    targets = torch.tensor(pattern).repeat(2, 1)
    features = model.frozen_features(pixels)
    assert features["pooled"].shape == (4, 64)
    if head == "cprfl":
        assert features["tokens"].ndim == 3 and features["tokens"].shape[0] == 4
    assert model(pixels).shape == (4, 3)

    loss_fn = make_loss(loss, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss_fn(model(pixels) if fusion else model.forward_features(features), targets)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert sum(losses[-3:]) / 3 < losses[0]  # CPRFL's dropout makes single steps noisy
    model.eval()
    with torch.no_grad():
        scores = model(pixels)
    # every label scores higher on the image that has it than on the one that has not
    gap = (scores[0] - scores[1]) * (targets[0] - targets[1])
    assert (gap > 0).all(), gap
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


@pytest.mark.parametrize(
    ("head", "options"),
    [("dualcoop", {}), ("dualcoop", {"class_specific_context": True}), ("linear", {}), ("cprfl", {})],
)
def test_scoring_some_columns_gives_their_logits_and_gradients(head, options) -> None:
    """A pass scores its own columns only (train.py): the head computes just those, with the values and
    gradients of the full computation's columns."""
    torch.manual_seed(0)
    clip_model, tokenizer = _clip("tiny")
    classes = [*CLASSES, "star", "heart"]
    model = build_classifier(clip_model, tokenizer, classes, head=head, device="cpu", options=HeadOptions(**options))
    model.eval()  # CPRFL's dropout off: the two computations must see the same network
    features = model.frozen_features(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    columns = torch.tensor([False, True, False, True, True])
    trainable = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads(some: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model.forward_features(features, columns) if some else model.forward_features(features)[:, columns]
        (logits * torch.arange(1.0, 4.0)[None]).sum().backward()
        return logits.detach(), [p.grad.clone() for p in trainable]

    some, some_grads = logits_and_grads(True)
    full, full_grads = logits_and_grads(False)
    assert some.shape == (3, 3)
    assert torch.allclose(some, full, atol=1e-5)
    for a, b in zip(some_grads, full_grads, strict=True):  # float32 sums in another order: relative 1e-7 here
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_scoring_computes_dualcoop_prompts_once_until_the_context_changes() -> None:
    """Without gradients every batch reads the same prompt features; a training step, a load or new classes
    make them anew (else a model would be scored with its old context)."""
    torch.manual_seed(0)
    clip_model, tokenizer = _clip("tiny")
    model = build_classifier(clip_model, tokenizer, CLASSES, head="dualcoop", device="cpu")
    features = model.frozen_features(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    encoded = []
    original = model.head._prompt_features
    model.head._prompt_features = lambda columns: encoded.append(columns) or original(columns)
    with torch.no_grad():
        first = model.forward_features(features)
        assert torch.equal(model.forward_features(features), first) and len(encoded) == 1  # once for both batches
    optimizer = torch.optim.SGD([model.head.context], lr=10.0)
    model.forward_features(features).sum().backward()  # with gradients: computed each time
    optimizer.step()
    with torch.no_grad():
        stepped = model.forward_features(features)
    assert len(encoded) == 3 and not torch.allclose(stepped, first)
    with torch.no_grad():
        model.head.context.copy_(torch.zeros_like(model.head.context))  # as load_state_dict does
        assert not torch.allclose(model.forward_features(features), stepped) and len(encoded) == 4
        model.head.set_classes(tokenizer, [*CLASSES, "star"])
        assert model.forward_features(features).shape == (2, 4) and len(encoded) == 5
