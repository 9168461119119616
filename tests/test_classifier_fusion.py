"""Fusion on tiny real open_clip encoders: starts at the frozen encoder, only fusion params train."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from mlgen.classifiers.fusion import BN_INIT_STD, FusedBlock, FusedConv, add_fusion, set_fusion_train
from mlgen.models.registry import open_clip_name


def _visual(name: str) -> torch.nn.Module:
    model_name, pretrained = open_clip_name(name)
    model = open_clip.create_model(model_name, pretrained=pretrained)
    return model.visual.eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-resnet"])
def test_fused_encoder_starts_at_the_frozen_one_and_only_fusion_trains(name: str) -> None:
    torch.manual_seed(0)
    visual = _visual(name)
    fused = copy.deepcopy(visual)
    params = add_fusion(fused)
    kind = FusedBlock if name == "tiny" else FusedConv
    assert any(isinstance(m, kind) for m in fused.modules())
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before, after = visual(pixels), fused(pixels)
    if name == "tiny":  # zero-initialised output projection: exactly the frozen encoder
        assert torch.equal(before, after)
    else:  # the paper's BN weight ~ N(0, 1e-4): the branch adds at most ~1e-4 relative noise
        assert (after - before).abs().max() <= 100 * BN_INIT_STD * before.abs().max()

    set_fusion_train(fused, True)
    loss = fused(pixels).square().mean()
    loss.backward()
    trainable = {id(p) for p in params}
    for p in fused.parameters():
        if id(p) in trainable:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # the frozen encoder's BatchNorm stays in eval mode (its pretrained statistics are not updated)
    branch_norms = {id(m.branch.norm) for m in fused.modules() if isinstance(m, FusedConv)}
    for m in fused.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and id(m) not in branch_norms:
            assert not m.training
