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
    """Global context for one conv, as the official ``global_branch.py`` computes it: reduce, aggregate (each of
    the 8 heads pools its own C/8 channel group with its softmax over positions), broadcast back (sigmoid),
    BatchNorm. The official module also defines ``v`` and ``proj`` 1x1 convs that its forward never applies;
    mlgen leaves them out. Only where a conv's output width differs from its input (never in CLIP's ResNets,
    where the official module would fail) a 1x1 projection maps the channels."""

    def __init__(self, in_channels: int, out_channels: int, heads: int = HEADS) -> None:
        super().__init__()
        if in_channels % heads:
            raise ValueError(f"GlobalBranch needs channels divisible by {heads} heads, got {in_channels}")
        self.heads = heads
        reduced = int(in_channels / 4)
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduced, 1), nn.ReLU(inplace=True))
        self.aggregate = nn.Conv2d(2 * reduced, heads, 1)  # softmax over H*W: where each head pools
        self.broadcast = nn.Conv2d(2 * reduced, heads, 1)  # sigmoid: how much of each head each position gets
        self.project = (
            nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else nn.Identity()
        )
        self.norm = nn.BatchNorm2d(out_channels)
        nn.init.normal_(self.norm.weight, std=BN_INIT_STD)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        reduced = self.reduce(x)
        context = torch.cat([reduced, reduced.mean(dim=(2, 3), keepdim=True).expand_as(reduced)], dim=1)
        attention = self.aggregate(context).flatten(2).softmax(dim=-1)  # [B, heads, HW]
        groups = x.reshape(batch, self.heads, channels // self.heads, height * width)  # [B, heads, C/heads, HW]
        pooled = (groups * attention[:, :, None]).sum(-1)  # [B, heads, C/heads]: each head its own group
        spread = self.broadcast(context).flatten(2).sigmoid()  # [B, heads, HW]
        out = (pooled[..., None] * spread[:, :, None]).reshape(batch, channels, height, width)
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
    """The whole encoder, fusion included, stays in eval mode whatever ``mode`` is, as the official trainer keeps
    the model in eval() and switches only the prompt learner to train: the frozen BatchNorm keeps its pretrained
    statistics and each GlobalBranch BatchNorm is a fixed affine map on running mean 0 / variance 1 whose weight
    and bias train (no batch statistics, so training and evaluation compute the same function)."""
    del mode
    visual.eval()
