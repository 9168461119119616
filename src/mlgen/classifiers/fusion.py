"""Feature fusion modules added to a FROZEN CLIP image encoder (methods.md A).

ResNet encoders: every 3x3 conv with more than 32 input channels becomes ``conv(x) + GlobalBranch(x)``.
ViT encoders (not in the paper): after every residual block, an attention module over the tokens is added
residually with a zero-initialised output projection. Either way the fused encoder starts (almost, for
ResNet; exactly, for ViT) at the pretrained encoder, and only the fusion parameters train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_CHANNELS = 32  # the paper fuses 3x3 convs with MORE than this many input channels
HEADS = 8
BN_INIT_STD = 1e-4  # the paper's BatchNorm weight ~ N(0, 1e-4): the branch starts near zero


class GlobalBranch(nn.Module):
    """Global context for one conv: reduce, aggregate x per attention head, broadcast back, BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, heads: int = HEADS) -> None:
        super().__init__()
        reduced = max(in_channels // 4, 1)
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduced, 1), nn.ReLU(inplace=True))
        self.aggregate = nn.Conv2d(2 * reduced, heads, 1)  # softmax over H*W: where each head pools
        self.broadcast = nn.Conv2d(2 * reduced, heads, 1)  # sigmoid: how much of each head each position gets
        self.project = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        nn.init.normal_(self.norm.weight, std=BN_INIT_STD)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        reduced = self.reduce(x)
        context = torch.cat([reduced, reduced.mean(dim=(2, 3), keepdim=True).expand_as(reduced)], dim=1)
        attention = self.aggregate(context).flatten(2).softmax(dim=-1)  # [B, heads, HW]
        pooled = attention @ x.flatten(2).transpose(1, 2)  # [B, heads, C]
        spread = self.broadcast(context).flatten(2).sigmoid()  # [B, heads, HW]
        out = (spread.transpose(1, 2) @ pooled).transpose(1, 2).reshape(batch, channels, height, width)
        return self.norm(self.project(out))


class FusedConv(nn.Module):
    """``conv(x) + GlobalBranch(x)``; the conv stays frozen."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.branch = GlobalBranch(conv.in_channels, conv.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        branch = self.branch(x)
        if branch.shape[-2:] != out.shape[-2:]:  # a strided conv
            branch = F.adaptive_avg_pool2d(branch, out.shape[-2:])
        return out + branch


class TokenFusion(nn.Module):
    """Self-attention over the tokens, its output projection zero-initialised (starts as the identity)."""

    def __init__(self, width: int, heads: int = HEADS) -> None:
        super().__init__()
        heads = heads if width % heads == 0 else 1
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, tokens: Tensor) -> Tensor:  # [B, L, D]
        normed = self.norm(tokens)
        return tokens + self.attention(normed, normed, normed, need_weights=False)[0]


class FusedBlock(nn.Module):
    """A frozen transformer block followed by a TokenFusion (handles either token layout)."""

    def __init__(self, block: nn.Module, width: int, batch_first: bool) -> None:
        super().__init__()
        self.block = block
        self.fusion = TokenFusion(width)
        self.batch_first = batch_first

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.block(x, *args, **kwargs)
        if self.batch_first:
            return self.fusion(out)
        return self.fusion(out.transpose(0, 1)).transpose(0, 1)


def _fuse_convs(module: nn.Module) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child.in_channels > MIN_CHANNELS:
            setattr(module, name, FusedConv(child))
            count += 1
        elif not isinstance(child, (FusedConv, GlobalBranch)):
            count += _fuse_convs(child)
    return count


def add_fusion(visual: nn.Module) -> list[nn.Parameter]:
    """Freeze ``visual`` (an open_clip image encoder), add fusion modules in place, return their parameters."""
    for parameter in visual.parameters():
        parameter.requires_grad_(False)
    transformer = getattr(visual, "transformer", None)
    if transformer is not None and hasattr(transformer, "resblocks"):
        batch_first = getattr(transformer, "batch_first", True)
        width = transformer.width
        transformer.resblocks = nn.ModuleList(
            [FusedBlock(block, width, batch_first) for block in transformer.resblocks]
        )
    elif _fuse_convs(visual) == 0:
        raise ValueError(f"no 3x3 conv with more than {MIN_CHANNELS} input channels in {type(visual).__name__}")
    return fusion_parameters(visual)


def fusion_modules(visual: nn.Module) -> list[nn.Module]:
    return [m for m in visual.modules() if isinstance(m, (GlobalBranch, TokenFusion))]


def fusion_parameters(visual: nn.Module) -> list[nn.Parameter]:
    params = [p for m in fusion_modules(visual) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def set_fusion_train(visual: nn.Module, mode: bool) -> None:
    """The frozen encoder stays in eval mode (its BatchNorm statistics are pretrained); fusion follows ``mode``."""
    visual.eval()
    for module in fusion_modules(visual):
        module.train(mode)
