"""Classification heads on top of frozen (CLIP) image features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LinearHead(nn.Module):
    """Cosine classifier: ``logit_scale * cos(features, W_c) + b_c``.

    Initialised from class (text) embeddings the untrained head is CLIP's zero-shot classifier.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        class_embeddings: Tensor | None = None,
        logit_scale: float = 20.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.logit_scale = float(logit_scale)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        if class_embeddings is None:
            nn.init.normal_(self.weight, std=0.02, generator=generator)
        else:
            if tuple(class_embeddings.shape) != (num_classes, dim):
                raise ValueError(
                    f"class_embeddings must have shape ({num_classes}, {dim}), got {tuple(class_embeddings.shape)}"
                )
            with torch.no_grad():
                self.weight.copy_(class_embeddings.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        features = F.normalize(features.to(self.weight.dtype), dim=-1)
        return self.logit_scale * features @ F.normalize(self.weight, dim=-1).T + self.bias

    def extra_repr(self) -> str:
        num_classes, dim = self.weight.shape
        return f"dim={dim}, num_classes={num_classes}, logit_scale={self.logit_scale}"


def encode_prompt_embeddings(clip_model, embeddings: Tensor, tokens: Tensor) -> Tensor:
    """open_clip ``encode_text`` from token EMBEDDINGS [P, L, W] (learned contexts spliced in) and the token ids."""
    from open_clip.transformer import text_global_pool

    x = embeddings + clip_model.positional_embedding.to(embeddings.dtype)
    x = clip_model.ln_final(clip_model.transformer(x, attn_mask=clip_model.attn_mask))
    x = text_global_pool(x, tokens, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class DualCoOpHead(nn.Module):
    """DualCoOp: learned positive and negative prompt contexts per class through the frozen CLIP text encoder.

    logit = 20 * cos(image, positive prompt) - 20 * cos(image, negative prompt): its sigmoid is the paper's
    2-way softmax over (negative, positive), so ASL on it is ASL on that softmax. (The code's x5 scale is for
    its spatial aggregation, which mlgen leaves out: the head uses the pooled embedding.)
    """

    def __init__(
        self,
        clip_model,
        tokenizer,
        classes: list[str],
        context_length: int = 64,
        logit_scale: float = 20.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.clip = [clip_model]  # a list: not a submodule, so its frozen weights are neither saved nor trained
        self.logit_scale = float(logit_scale)
        placeholder = " ".join(["X"] * context_length)
        tokens = tokenizer([f"{placeholder} {name}." for name in classes])
        self.register_buffer("tokens", tokens, persistent=False)
        with torch.no_grad():
            self.register_buffer("token_embeddings", clip_model.token_embedding(tokens).float(), persistent=False)
        width = self.token_embeddings.shape[-1]
        self.context_length = context_length
        # per class, a positive and a negative context [2, C, n_ctx, W] (class-specific contexts, as the paper)
        self.context = nn.Parameter(torch.empty(2, len(classes), context_length, width))
        nn.init.normal_(self.context, std=0.02, generator=generator)

    def text_features(self) -> Tensor:
        clip_model = self.clip[0]
        prefix, suffix = self.token_embeddings[:, :1], self.token_embeddings[:, 1 + self.context_length :]
        prompts = [torch.cat([prefix, ctx, suffix], dim=1) for ctx in self.context]  # positive, negative
        embeddings = torch.cat(prompts).to(clip_model.token_embedding.weight.dtype)
        features = encode_prompt_embeddings(clip_model, embeddings, self.tokens.repeat(2, 1)).float()
        return F.normalize(features, dim=-1).view(2, len(self.tokens), -1)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        image = F.normalize(features["pooled"].float(), dim=-1)
        positive, negative = self.text_features()
        return self.logit_scale * (image @ positive.T - image @ negative.T)


class CPRFLHead(nn.Module):
    """CPRFL (methods.md B): PI network on class text embeddings, ONE VSI layer, logit_i = p_i' . p_i."""

    def __init__(
        self,
        class_embeddings: Tensor,
        visual_dim: int,
        dim: int = 512,
        tau: float = 0.5,
        heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        text_dim = class_embeddings.shape[1]
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        hidden = int(tau * dim)
        self.prompt_init = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.visual_proj = nn.Linear(visual_dim, dim)
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.attn_dropout = dropout
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def _attention(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.attn_out(out.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        visual = self.visual_proj(features["tokens"].float())  # [N, T, d]
        prompts = self.prompt_init(self.class_embeddings)  # [C, d]
        x = torch.cat([visual, prompts.expand(visual.shape[0], -1, -1)], dim=1)
        x = self._attention(self.norm1(x))  # PreNorm attention, NO residual (the official code)
        x = self.mlp(self.norm2(x))  # PreNorm MLP, NO residual
        refined = x[:, -prompts.shape[0] :]  # [N, C, d]
        return (refined * prompts).sum(-1)  # dual path: prompts also reach the score directly
