"""The classifier's modules and losses as the official code computes them (issue 15, points 1-6, 13, 14),
on tiny real open_clip models."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mlgen.classifiers.cache import model_key
from mlgen.classifiers.fusion import GlobalBranch
from mlgen.classifiers.losses import asymmetric_loss, make_loss, mlcd_cosine_loss
from mlgen.classifiers.model import HeadOptions, build_classifier
from mlgen.models.registry import open_clip_name

CLASSES = ["circle", "square", "triangle"]


def _clip(name: str):
    model_name, pretrained = open_clip_name(name)
    model = open_clip.create_model(model_name, pretrained=pretrained)
    return model.eval(), open_clip.get_tokenizer(model_name)


def _asl_grad(focal_weight_grad: bool | None) -> torch.Tensor:
    logits = torch.tensor([[-3.0, -1.0, 0.5, 2.0], [1.5, -2.5, -0.2, 0.3]], requires_grad=True)
    targets = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]])
    kwargs = {} if focal_weight_grad is None else {"focal_weight_grad": focal_weight_grad}
    asymmetric_loss(logits, targets, 4.0, 0.0, 0.05, **kwargs).backward()
    return logits.grad


def test_asl_focal_weight_carries_no_gradient_by_default() -> None:
    default, detached, through = _asl_grad(None), _asl_grad(False), _asl_grad(True)
    assert torch.equal(default, detached)
    assert not torch.allclose(default, through, rtol=1e-3)


def test_dualcoop_loss_is_one_hundredth_of_the_asl_sum() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 5) * 3, (torch.rand(6, 5) < 0.3).long()
    loss = make_loss("asl", "dualcoop")
    expected = 0.01 * asymmetric_loss(logits, targets, 2.0, 1.0, 0.05, reduction="sum")
    assert torch.allclose(loss(logits, targets), expected)
    assert loss.reduction == "sum"


def test_dualcoop_context_is_shared_and_scores_names_it_never_trained_on() -> None:
    clip_model, tokenizer = _clip("tiny")
    model = build_classifier(clip_model, tokenizer, CLASSES, head="dualcoop")
    head = model.head
    assert head.context.shape == (2, head.context_length, head.token_embeddings.shape[-1])  # no class dim
    torch.manual_seed(0)
    features = model.frozen_features(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        head.context.normal_(std=0.5)  # "trained" contexts
    head.set_classes(tokenizer, ["star", "heart"])
    with torch.no_grad():
        scores = model.forward_features(features)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[:, 0], scores[:, 1])  # the class name matters, the context is shared
    specific = build_classifier(clip_model, tokenizer, CLASSES, head="dualcoop", options=HeadOptions(True)).head
    assert specific.context.shape[:2] == (2, len(CLASSES))
    with pytest.raises(ValueError, match="class-specific"):
        specific.set_classes(tokenizer, ["star", "heart"])


def _hand_dense_resnet(visual, pixels: torch.Tensor) -> torch.Tensor:
    """The official AttentionConv's x2: [mean; positions] + positional embedding through v_proj and c_proj."""
    with torch.no_grad():
        x = visual.stem(pixels)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        x = x.flatten(2).permute(2, 0, 1)  # (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + visual.attnpool.positional_embedding[:, None]
        x = F.linear(x, visual.attnpool.v_proj.weight, visual.attnpool.v_proj.bias)
        return F.linear(x, visual.attnpool.c_proj.weight, visual.attnpool.c_proj.bias).permute(1, 0, 2)


def test_dualcoop_dense_scoring_is_the_official_region_aggregation() -> None:
    clip_model, tokenizer = _clip("tiny-resnet")
    model = build_classifier(clip_model, tokenizer, CLASSES, head="dualcoop")
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    features = model.frozen_features(pixels)
    assert torch.allclose(features["dense"], _hand_dense_resnet(model.visual, pixels), atol=1e-5)
    with torch.no_grad():
        model.head.context.normal_(std=0.5)
        positive, negative = model.head.text_features()
        scores = model.forward_features(features)
    # the official DualCoop.forward: conv1d of the normalised map with [negative; positive] prompts x 20,
    # softmax over regions of the positive half, both halves weighted by it, summed, x 5
    regions = F.normalize(features["dense"], dim=-1).transpose(1, 2)  # [N, D, R]
    output = 20 * F.conv1d(regions, torch.cat([negative, positive])[:, :, None])  # [N, 2C, R]
    weights = output[:, len(CLASSES) :].softmax(dim=-1).repeat(1, 2, 1)
    logits = (5 * (output * weights).sum(-1)).view(2, 2, len(CLASSES))  # [N, (neg, pos), C]
    assert torch.allclose(torch.sigmoid(scores), logits.softmax(dim=1)[:, 1], atol=1e-5)
    pooled = build_classifier(
        clip_model, tokenizer, CLASSES, "dualcoop", options=HeadOptions(dualcoop_scoring="pooled")
    )
    assert "dense" not in pooled.frozen_features(pixels)
    assert model_key("tiny-resnet", model) != model_key("tiny-resnet", pooled)  # the cache keeps them apart


def test_vit_dense_map_is_every_token_through_ln_post_and_proj() -> None:
    clip_model, tokenizer = _clip("tiny")
    model = build_classifier(clip_model, tokenizer, CLASSES, head="dualcoop")
    features = model.frozen_features(torch.randn(2, 3, 64, 64))
    patches = model._tap.value.shape[1]
    assert features["dense"].shape == (2, 1 + patches, model.visual.output_dim)
    # the class token's dense embedding is the pooled embedding (ln_post, proj on token 0)
    assert torch.allclose(features["dense"][:, 0], features["pooled"], atol=1e-5)


def _official_globalbranch_params(channels: int, heads: int = 8, reduction: int = 4) -> int:
    """The layers the official GlobalBranch.forward applies: reduction, agg_attn, broad_attn, norm."""
    mid = int(channels / reduction)
    return (channels * mid + mid) + 2 * (2 * mid * heads + heads) + 2 * channels


def _official_globalbranch_forward(branch: GlobalBranch, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    local = branch.reduce(x)
    hidden = torch.cat([local, local.mean([2, 3], keepdim=True).expand(-1, -1, h, w)], 1)
    agg = branch.aggregate(hidden).view(b, -1, h * w).softmax(2).view(b, -1, h, w)
    broad = branch.broadcast(hidden).sigmoid()
    v = (x.view(b, 8, -1, h, w) * agg.unsqueeze(2)).sum([-1, -2]).view(b, 8, -1, 1, 1)
    v = (v.expand(-1, -1, -1, h, w) * broad.unsqueeze(2)).view(b, c, h, w)
    return branch.norm(v)


@pytest.mark.parametrize("channels", [64, 512])
def test_global_branch_is_the_official_module(channels: int) -> None:
    branch = GlobalBranch(channels, channels).eval()
    assert sum(p.numel() for p in branch.parameters()) == _official_globalbranch_params(channels)
    with torch.no_grad():
        branch.norm.weight.fill_(1.0)
        x = torch.randn(2, channels, 5, 5)
        assert torch.allclose(branch(x), _official_globalbranch_forward(branch, x), atol=1e-5)


def test_fusion_batchnorm_statistics_do_not_move_in_training() -> None:
    clip_model, tokenizer = _clip("tiny-resnet")
    model = build_classifier(clip_model, tokenizer, CLASSES, head="linear", fusion=True)
    before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    model.train()
    assert model.head.training and not model.visual.training
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    make_loss("asl")(model(torch.randn(4, 3, 64, 64)), torch.tensor([[1, 0, 1]] * 4)).backward()
    optimizer.step()
    assert before and all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in before.items())


def test_cprfl_official_recipe_reads_raw_text_features_on_a_wide_layer() -> None:
    clip_model, tokenizer = _clip("tiny-resnet")
    official = build_classifier(clip_model, tokenizer, CLASSES, "cprfl", options=HeadOptions(cprfl_recipe="official"))
    mlgen = build_classifier(clip_model, tokenizer, CLASSES, "cprfl", options=HeadOptions(cprfl_recipe="mlgen"))
    assert HeadOptions().cprfl_recipe == "official"  # the default since the recipe is wired into fit
    raw = clip_model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES])).float()
    assert torch.allclose(official.head.class_embeddings, raw, atol=1e-5)
    assert torch.allclose(mlgen.head.class_embeddings.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5)
    width = clip_model.visual.layer4[-1].conv3.out_channels
    assert official.head.visual_proj.out_features == min(width, 2048) and official.head.dim_head == min(512, width)


def test_mlcd_loss_on_the_linear_head_has_its_margin() -> None:
    clip_model, tokenizer = _clip("tiny")
    model = build_classifier(clip_model, tokenizer, CLASSES, head="linear")
    torch.manual_seed(0)
    features = model.frozen_features(torch.randn(4, 3, 64, 64))
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    logits = model.forward_features(features)
    cosines = F.normalize(features["pooled"], dim=-1) @ F.normalize(model.head.weight, dim=-1).T
    torch.manual_seed(1)
    value = make_loss("mlcd", "linear", model)(logits, targets)
    torch.manual_seed(1)
    expected = mlcd_cosine_loss(cosines, targets.bool(), margin=0.3, scale=32.0, negative_fraction=0.1)
    torch.manual_seed(1)
    no_margin = mlcd_cosine_loss(cosines, targets.bool(), margin=0.0, scale=32.0, negative_fraction=0.1)
    assert torch.allclose(value, expected) and not math.isclose(value.item(), no_margin.item(), rel_tol=1e-3)
    value.backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


def test_dualcoop_learns_on_a_short_window_text_tower_with_a_short_context() -> None:
    """The toy CLIP's text tower was trained on short captions: with the official 64 (capped to 27) context
    tokens the class name sits at positions it never learned and DualCoOp learns nothing (real-test mAP fell
    from 0.51 to 0.37 in a probe); with ``prompt_context=4`` the same head and data learn."""
    from mlgen.classifiers.metrics import mean_average_precision
    from mlgen.classifiers.train import Pass, fit
    from mlgen.world.render import SHAPES, render_scene
    from mlgen.world.streams import stream_rng
    from mlgen.world.train_clip import normalize

    clip_model, tokenizer = _clip("toy")
    model = build_classifier(clip_model, tokenizer, list(SHAPES), "dualcoop", options=HeadOptions(prompt_context=4))
    assert model.head.context.shape[1] == 4

    def features(stream: str, n: int):
        rng = stream_rng(stream, 0)
        scenes = [render_scene(rng) for _ in range(n)]
        pixels = torch.stack([torch.from_numpy(p.copy()) for p, _, _ in scenes]).permute(0, 3, 1, 2)
        targets = torch.tensor([[s in names for s in SHAPES] for _, names, _ in scenes]).float()
        return model.frozen_features(normalize(pixels.float() / 127.5 - 1)), targets

    (train, y), (test, truth) = features("oracle", 192), features("test", 192)
    batches = [({k: v[i : i + 32] for k, v in train.items()}, y[i : i + 32]) for i in range(0, 192, 32)]
    fit(model, [Pass(lambda epoch: batches)], epochs=6)
    with torch.no_grad():
        learned = mean_average_precision(model.forward_features(test).numpy(), truth.numpy())
    assert learned > 0.95
