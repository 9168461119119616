"""Training a linear (cosine) multi-label head on precomputed features with ASL."""

from __future__ import annotations

import torch
from torch import Tensor

from mlgen.classifiers.heads import LinearHead
from mlgen.classifiers.losses import asymmetric_loss
from mlgen.progress import progress as show_progress


def train_linear_head(
    features: Tensor,
    targets: Tensor,
    class_embeddings: Tensor | None,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 1e-4,
    progress: bool = True,
) -> tuple[LinearHead, list[float]]:
    """Fit a :class:`LinearHead` with AdamW + ASL; returns the head (eval mode) and per-epoch mean loss."""
    if features.ndim != 2 or targets.ndim != 2 or features.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected features [N, D] and targets [N, C], got {tuple(features.shape)}, {tuple(targets.shape)}"
        )
    if features.shape[0] == 0 or epochs < 0 or batch_size < 1:
        raise ValueError("need at least one sample, epochs >= 0 and batch_size >= 1")
    device = features.device
    generator = torch.Generator().manual_seed(seed)
    head = LinearHead(features.shape[1], targets.shape[1], class_embeddings, generator=generator).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    features, targets = features.float(), targets.float().to(device)
    n = features.shape[0]
    history: list[float] = []
    head.train()
    bar = show_progress(range(epochs), "train head", "epoch", disable=not progress)
    for _ in bar:
        total = 0.0
        for idx in torch.randperm(n, generator=generator).to(device).split(batch_size):
            loss_sum = asymmetric_loss(
                head(features[idx]),
                targets[idx],
                gamma_neg=4.0,
                gamma_pos=0.0,
                clip=0.05,
            )
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / idx.numel()).backward()  # per-sample loss: lr independent of batch size
            optimizer.step()
            total += loss_sum.item()
        history.append(total / n)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    return head.eval(), history


def predict_scores(head: LinearHead, features: Tensor, batch_size: int = 1024) -> Tensor:
    """Sigmoid probabilities [N, C] (on CPU), computed batch-wise on the head's device."""
    device = head.weight.device
    with torch.inference_mode():
        chunks = [torch.sigmoid(head(batch.to(device))).cpu() for batch in features.split(batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, head.weight.shape[0])
