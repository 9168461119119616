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
