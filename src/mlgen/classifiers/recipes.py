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

CPRFL_LR = 1e-5  # official CPRFL: AdamW 1e-5, weight decay 1e-4, OneCycle (pct_start 0.2), EMA decay 0.998
CPRFL_WEIGHT_DECAY = 1e-4
CPRFL_PCT_START = 0.2
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


def recipe(model: nn.Module, total_steps: int | Callable[[], int], lr: float | None = None):
    """``(optimizer, scheduler, ema)`` for a head with its own official recipe, else None.

    ``model`` is a MultiLabelClassifier; only CPRFL built with ``cprfl_recipe="official"`` has one: AdamW
    (lr ``lr`` or 1e-5) with a per-step OneCycle schedule to that maximum, and an EMA of decay 0.998.
    """
    if model.head_name != "cprfl" or model.options.cprfl_recipe != "official":
        return None
    if callable(total_steps):
        total_steps = total_steps()
    params = [p for p in model.parameters() if p.requires_grad]
    max_lr = lr or CPRFL_LR
    optimizer = torch.optim.AdamW(params, lr=max_lr, weight_decay=CPRFL_WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(total_steps, 1), pct_start=CPRFL_PCT_START
    )
    return optimizer, scheduler, Ema(model, CPRFL_EMA_DECAY)
