"""The classifier's training loop: the paper's optimisers, alternating real/synthetic epochs, DDP-ready.

Data parallel: under torchrun every rank takes its slice of each GLOBAL batch and gradients are summed over
ranks with each rank's loss weighted by its share of the batch, so N ranks compute exactly the gradient of one
process on the same global batch (the losses here are means over samples).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from mlgen.classifiers.losses import make_loss
from mlgen.classifiers.model import MultiLabelClassifier

Batch = tuple[Tensor | dict[str, Tensor], Tensor]  # (pixels or cached features, multi-hot targets)
FUSION_LR = 1e-4  # methods.md A: the GlobalBranch parameters


def alternating(real: Callable[[int], Iterable[Batch]], synthetic: Callable[[int], Iterable[Batch]]):
    """The paper's schedule: even epochs real images of seen classes, odd epochs synthetic unseen ones."""
    return lambda epoch: real(epoch) if epoch % 2 == 0 else synthetic(epoch)


def make_optimizer(model: MultiLabelClassifier, lr: float | None, total_steps: int):
    """Linear head: AdamW (lr 1e-3, as before). Prompt/fusion heads: the paper's SGD lr 0.002 with a cosine
    schedule; fusion parameters at lr 1e-4."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    fusion = [p for n, p in model.visual.named_parameters() if p.requires_grad]
    if model.head_name == "linear" and not fusion:
        optimizer = torch.optim.AdamW(head, lr=lr or 1e-3, weight_decay=1e-4)
    else:
        groups = [{"params": head, "lr": lr or 0.002}]
        if fusion:
            groups.append({"params": fusion, "lr": FUSION_LR})
        optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return optimizer, schedule


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _slice(inputs: Tensor | dict[str, Tensor], index: slice) -> Tensor | dict[str, Tensor]:
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def fit(
    model: MultiLabelClassifier,
    train_batches_fn: Callable[[int], Iterable[Batch]],
    epochs: int,
    loss: str = "asl",
    lr: float | None = None,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters; returns the mean loss per epoch (over all ranks' samples).

    ``train_batches_fn(epoch)`` yields GLOBAL batches (the same on every rank); inputs are pixels, or cached
    feature dicts when ``model.cacheable``. ``steps_per_epoch`` sizes the cosine schedule (default: counted).
    """
    torch.manual_seed(seed)
    rank, world = _rank_world()
    loss_fn = make_loss(loss, model.head_name)
    if steps_per_epoch is None:
        steps_per_epoch = sum(1 for _ in train_batches_fn(0))
    optimizer, schedule = make_optimizer(model, lr, epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    history: list[float] = []
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for inputs, targets in train_batches_fn(epoch):
            n = targets.shape[0]
            local = slice(rank * n // world, (rank + 1) * n // world)
            x, y = _slice(inputs, local), targets[local].to(device)
            optimizer.zero_grad(set_to_none=True)
            if y.shape[0]:
                x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
                logits = model.forward_features(x) if isinstance(x, dict) else model(x)
                value = loss_fn(logits.float(), y) * (y.shape[0] / n)
                value.backward()
            else:  # this rank has no sample in a tiny batch: it still joins the all-reduce
                value = torch.zeros((), device=device)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if world > 1:
                for p in params:
                    dist.all_reduce(p.grad)
                dist.all_reduce(value := value.detach().clone())
            optimizer.step()
            schedule.step()
            total += float(value.detach()) * n
            count += n
        history.append(total / max(count, 1))
        if log is not None and rank == 0:
            log(epoch, history[-1])
    return history
