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
        cosines = F.normalize(features.to(self.weight.dtype), dim=-1) @ F.normalize(self.weight, dim=-1).T
        self.last_cosines = cosines  # what the margined MLCD loss reads (losses.make_loss)
        return self.logit_scale * cosines + self.bias

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


SCORINGS = ("dense", "pooled")
REGION_SCALE, AGGREGATE_SCALE = 20.0, 5.0  # the official per-region cosine x 20, aggregated x 5 (effective 100)


class DualCoOpHead(nn.Module):
    """DualCoOp: learned positive and negative prompt contexts through the frozen CLIP text encoder.

    As the official code (CSC=False) ONE class-agnostic positive and one negative context are shared by all
    classes, so the head scores any class name, also one it never trained on (:meth:`set_classes`);
    ``class_specific=True`` learns one pair per class instead. Scoring ``dense`` (official): per-region cosine
    x 20 against both prompts, a softmax over regions of the positive ones, the weighted sums x 5; ``pooled``:
    100 x cosine on the pooled embedding (the same effective scale). The returned logit is positive minus
    negative: its sigmoid is the official 2-way softmax, so ASL on it is ASL on that softmax.
    """

    def __init__(
        self,
        clip_model,
        tokenizer,
        classes: list[str],
        context_length: int = 64,
        class_specific: bool = False,
        scoring: str = "dense",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.clip = [clip_model]  # a list: not a submodule, so its frozen weights are neither saved nor trained
        self.class_specific = class_specific
        self.scoring = scoring
        self.context_length = context_length
        self._scoring: tuple[tuple, Tensor] | None = None  # (the context's state, its prompt features)
        self.set_classes(tokenizer, classes)
        width = self.token_embeddings.shape[-1]
        shape = (2, len(classes), context_length, width) if class_specific else (2, context_length, width)
        self.context = nn.Parameter(torch.empty(shape))  # [positive, negative]
        nn.init.normal_(self.context, std=0.02, generator=generator)

    def set_classes(self, tokenizer, classes: list[str]) -> None:
        """Score ``classes`` from now on (the shared context carries over to names never trained on)."""
        if self.class_specific and hasattr(self, "context") and self.context.shape[1] != len(classes):
            raise ValueError("class-specific contexts cannot score other classes: use the shared context")
        placeholder = " ".join(["X"] * self.context_length)
        tokens = tokenizer([f"{placeholder} {name}." for name in classes])
        clip_model = self.clip[0]
        device = clip_model.token_embedding.weight.device
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        with torch.no_grad():
            embeddings = clip_model.token_embedding(self.tokens).float()
        self.register_buffer("token_embeddings", embeddings, persistent=False)
        self._scoring = None

    def text_features(self, columns: Tensor | None = None) -> Tensor:
        """Normalised prompt features [2 (positive, negative), C, D]; with ``columns`` (a boolean mask over the
        classes) those classes' only: the text encoder is most of a step's cost with many labels (NUS-WIDE's
        1,006), and a pass scores only its own columns. Without gradients (scoring) every batch reads the same
        features, computed once while the context is unchanged (an optimizer step or a load bumps its version)."""
        if columns is not None or torch.is_grad_enabled():
            return self._prompt_features(columns)
        state = (self.context._version, self.context.data_ptr(), self.context.device)
        if self._scoring is None or self._scoring[0] != state:
            self._scoring = (state, self._prompt_features(None))
        return self._scoring[1]

    def _prompt_features(self, columns: Tensor | None) -> Tensor:
        clip_model = self.clip[0]
        pick = slice(None) if columns is None else columns.to(self.tokens.device).nonzero().squeeze(1)
        tokens, token_embeddings = self.tokens[pick], self.token_embeddings[pick]
        classes = len(tokens)
        prefix, suffix = token_embeddings[:, :1], token_embeddings[:, 1 + self.context_length :]
        contexts = self.context[:, pick] if self.class_specific else self.context[:, None].expand(-1, classes, -1, -1)
        prompts = [torch.cat([prefix, ctx, suffix], dim=1) for ctx in contexts]
        embeddings = torch.cat(prompts).to(clip_model.token_embedding.weight.dtype)
        features = encode_prompt_embeddings(clip_model, embeddings, tokens.repeat(2, 1)).float()
        return F.normalize(features, dim=-1).view(2, classes, -1)

    def forward(self, features: dict[str, Tensor], columns: Tensor | None = None) -> Tensor:
        """Logits [N, C], or [N, columns] with ``columns`` (each class is scored on its own: the same values)."""
        positive, negative = self.text_features(columns)
        if self.scoring == "pooled":
            image = F.normalize(features["pooled"].float(), dim=-1)
            return REGION_SCALE * AGGREGATE_SCALE * (image @ positive.T - image @ negative.T)
        regions = F.normalize(features["dense"].float(), dim=-1)  # [N, R, D]
        pos = REGION_SCALE * regions @ positive.T  # [N, R, C]
        neg = REGION_SCALE * regions @ negative.T
        weights = pos.softmax(dim=1)  # over regions, from the positive scores (official)
        return AGGREGATE_SCALE * ((pos - neg) * weights).sum(dim=1)


class CPRFLHead(nn.Module):
    """CPRFL (methods.md B): PI network on class text embeddings, ONE VSI layer, logit_i = p_i' . p_i.

    ``dim_head`` None: ``dim / heads`` per head (mlgen); the official layer uses 512 per head (inner width
    heads x 512). ``mlp_dim`` None: 4 x ``dim`` (mlgen); official 2048.
    """

    def __init__(
        self,
        class_embeddings: Tensor,
        visual_dim: int,
        dim: int = 512,
        tau: float = 0.5,
        heads: int = 8,
        dropout: float = 0.1,
        dim_head: int | None = None,
        mlp_dim: int | None = None,
    ) -> None:
        super().__init__()
        text_dim = class_embeddings.shape[1]
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        hidden = int(tau * dim)
        self.prompt_init = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.visual_proj = nn.Linear(visual_dim, dim)
        self.heads = heads
        self.dim_head = dim_head or dim // heads
        inner = self.heads * self.dim_head
        mlp_dim = mlp_dim or 4 * dim
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.attn_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))  # no dropout on the weights
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )

    def _attention(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # the official attention has no dropout of its own
        return self.attn_out(out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        visual = self.visual_proj(features["tokens"].float())  # [N, T, d]
        prompts = self.prompt_init(self.class_embeddings)  # [C, d]
        x = torch.cat([visual, prompts.expand(visual.shape[0], -1, -1)], dim=1)
        x = self._attention(self.norm1(x))  # PreNorm attention, NO residual (the official code)
        x = self.mlp(self.norm2(x))  # PreNorm MLP, NO residual
        refined = x[:, -prompts.shape[0] :]  # [N, C, d]
        return (refined * prompts).sum(-1)  # dual path: prompts also reach the score directly
