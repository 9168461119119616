"""Head-specific training recipes that differ from the shared loop's optimizer: CPRFL's official one.

``recipe(model, total_steps, lr)`` returns ``(optimizer, scheduler, ema)`` or None when the head trains with the
shared defaults. The trainer steps ``scheduler`` after every optimizer step (OneCycle is per step), calls
``ema.update(model)`` after every optimizer step and ``ema.copy_to(model)`` once training ends, so the saved and
scored weights are the averaged ones, as the official CPRFL code evaluates its EMA model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

CPRFL_LR = 1e-5  # official CPRFL (train.py): AdamW 1e-5, weight decay 1e-4 on matrices only, OneCycle
CPRFL_WEIGHT_DECAY = 1e-4  # (pct_start 0.1), EMA decay 0.998
CPRFL_PCT_START = 0.1
CPRFL_EMA_DECAY = 0.998


class Ema:
    """Exponential moving average of the trainable parameters: ``avg = decay * avg + (1 - decay) * value``."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(parameter.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            if name in self.shadow:
                parameter.copy_(self.shadow[name])

    def state(self) -> dict[str, Tensor]:
        return dict(self.shadow)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups, as the official ``add_weight_decay``: biases and other 1-D
    parameters (norm scales) without weight decay, the rest with ``weight_decay``."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def recipe(model: nn.Module, total_steps: int | Callable[[], int], lr: float | None = None):
    """``(optimizer, scheduler, ema)`` for a head with its own official recipe, else None.

    ``model`` is a MultiLabelClassifier; only CPRFL built with ``cprfl_recipe="official"`` has one: AdamW
    (lr ``lr`` or 1e-5; weight decay on matrices only) with a per-step OneCycle schedule to that maximum
    (10% warm-up), and an EMA of decay 0.998.
    """
    if model.head_name != "cprfl" or model.options.cprfl_recipe != "official":
        return None
    if callable(total_steps):
        total_steps = total_steps()
    max_lr = lr or CPRFL_LR
    optimizer = torch.optim.AdamW(decay_groups(model, CPRFL_WEIGHT_DECAY), lr=max_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(total_steps, 1), pct_start=CPRFL_PCT_START
    )
    return optimizer, scheduler, Ema(model, CPRFL_EMA_DECAY)
