"""The classifier's training loop: the official Diff-ZS-MLC schedule (per-source passes, per-source label
masks, a constant warm-up, a cosine stepped once per pass), DDP-ready.

Every epoch runs the sources' passes in order (real seen-label images, then synthetic unseen ones, as the
official ``train_coop`` then ``train_coop_synthetic``); the learning-rate scheduler steps once after each pass,
exactly as the official code (Dassl's ``ConstantWarmupScheduler`` around ``CosineAnnealingLR(T_max=epochs)``).
A pass scores its batches on its own columns only (``Pass.columns``): a real batch on the seen labels, a
synthetic batch on the unseen ones.

Data parallel: under torchrun every rank takes its slice of each GLOBAL batch and gradients are summed over
ranks (a mean loss is weighted by the rank's share of the batch), so N ranks compute exactly the gradient of
one process on the same global batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mlgen.classifiers.losses import make_loss
from mlgen.classifiers.model import MultiLabelClassifier
from mlgen.classifiers.recipes import recipe

Batch = tuple[Tensor | dict[str, Tensor], Tensor]  # (pixels or cached features, multi-hot targets)
FUSION_LR = 1e-4  # methods.md A: the GlobalBranch parameters
WARMUP_LR = 1e-5  # the official constant warm-up (Dassl WARMUP_CONS_LR), one scheduler step
SGD_LR, SGD_WEIGHT_DECAY = 0.002, 5e-4  # the official DualCoOp / Diff-ZS-MLC optimiser
ADAMW_LR, ADAMW_WEIGHT_DECAY = 1e-3, 1e-4  # mlgen's linear head
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Pass:
    """One source's pass of an epoch: ``batches(epoch)`` yields its global batches, scored on ``columns``
    (a boolean mask over the classes; None: every column)."""

    batches: Callable[[int], Iterable[Batch]]
    columns: Tensor | None = None
    name: str = "synthetic"


@dataclass
class FitResult:
    """Mean loss per epoch, the optimizer steps taken (per pass name too), the learning rate of each step (group
    0), and with checkpoint selection the validation score of each evaluated epoch and the epoch kept."""

    history: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    lr_trace: list[float] = field(default_factory=list)
    steps_by_pass: dict[str, int] = field(default_factory=dict)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (epoch, score)
    selected_epoch: int | None = None
    # ``official`` selection (the official code's): each epoch's TEST scores by setting, and per setting the
    # epoch of the best one with a copy of its weights
    official: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    official_best: dict[str, tuple[int, dict[str, Tensor]]] = field(default_factory=dict)


def fixed_length(one: Pass, steps: int) -> Pass:
    """``one`` with exactly ``steps`` batches in every epoch, whatever its source's size: epoch e takes batches
    e*steps .. (e+1)*steps - 1 of the source's epochs chained end to end (each reshuffled as usual). Arms with
    more or fewer images then get the same number of optimizer steps on their columns."""
    state: dict[str, Any] = {"chain": None, "next": 0}

    def chain() -> Iterator[Batch]:
        epoch = 0
        while True:
            empty = True
            for batch in one.batches(epoch):
                empty = False
                yield batch
            if empty:
                return
            epoch += 1

    def batches(epoch: int) -> Iterator[Batch]:
        if state["chain"] is None or epoch != state["next"]:  # not the next epoch (a count, a restart): replay
            state["chain"] = chain()
            for _ in itertools.islice(state["chain"], epoch * steps):
                pass
        state["next"] = epoch + 1
        yield from itertools.islice(state["chain"], steps)

    return Pass(batches, one.columns, one.name)


def idle_pass(name: str = "idle") -> Pass:
    """A pass with no batch: the learning-rate schedule still steps after it (a one-source arm then follows the
    same learning-rate curve as the two-pass arms it is compared with)."""
    return Pass(lambda epoch: iter(()), None, name)


def alternating(real: Callable[[int], Iterable[Batch]], synthetic: Callable[[int], Iterable[Batch]]):
    """mlgen's former schedule, kept for callers: even epochs real images, odd epochs synthetic ones."""
    return lambda epoch: real(epoch) if epoch % 2 == 0 else synthetic(epoch)


def default_optimizer(model: MultiLabelClassifier) -> str:
    """The official SGD for every head: on the toy world it beat AdamW for the linear head too (README)."""
    return "sgd"


def make_optimizer(model: MultiLabelClassifier, lr: float | None, name: str | None = None) -> torch.optim.Optimizer:
    """SGD (lr 0.002, momentum 0.9, weight decay 5e-4; fusion at 1e-4) or AdamW (lr 1e-3, weight decay 1e-4)."""
    name = name or default_optimizer(model)
    head = [p for p in model.head.parameters() if p.requires_grad]
    fusion = [p for p in model.visual.parameters() if p.requires_grad]
    if name == "adamw":
        groups = [{"params": head, "lr": lr or ADAMW_LR}] + ([{"params": fusion, "lr": FUSION_LR}] if fusion else [])
        return torch.optim.AdamW(groups, weight_decay=ADAMW_WEIGHT_DECAY)
    groups = [{"params": head, "lr": lr or SGD_LR}] + ([{"params": fusion, "lr": FUSION_LR}] if fusion else [])
    return torch.optim.SGD(groups, lr=lr or SGD_LR, momentum=0.9, weight_decay=SGD_WEIGHT_DECAY)


class PassSchedule:
    """The official learning rate per scheduler step (one step per pass): step 0 (the warm-up) at 1e-5, step
    ``s >= 1`` at ``CosineAnnealingLR(T_max)`` of ``s - 1``, whose closed form keeps its period past T_max."""

    def __init__(self, optimizer: torch.optim.Optimizer, t_max: int, warmup: int = 1) -> None:
        self.optimizer, self.t_max, self.warmup = optimizer, max(t_max, 1), warmup
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def lr(self, base: float, step: int) -> float:
        if step < self.warmup:
            return WARMUP_LR
        return base * (1 + math.cos(math.pi * (step - self.warmup) / self.t_max)) / 2

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = self.lr(base, self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _slice(inputs: Tensor | dict[str, Tensor], index: slice) -> Tensor | dict[str, Tensor]:
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def _as_passes(batches: Sequence[Pass] | Pass | Callable[[int], Iterable[Batch]]) -> list[Pass]:
    if isinstance(batches, Pass):
        return [batches]
    if callable(batches):
        return [Pass(batches)]
    return list(batches)


def _pass_stream(passes: list[Pass], epochs: int | None) -> Iterator[tuple[int, Pass]]:
    """(epoch, pass) in order: ``epochs`` epochs, or without end (``steps`` stops the loop)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        for one in passes:
            yield epoch, one
        epoch += 1


def _passes_for_steps(passes: list[Pass], steps: int) -> int:
    """How many passes ``steps`` optimizer steps take (cycling the passes; the last one may be cut short)."""
    sizes = [sum(1 for _ in p.batches(0)) for p in passes]
    if not any(sizes):
        raise ValueError("every training pass is empty")
    count = done = 0
    while done < steps:
        done += sizes[count % len(sizes)]
        count += 1
    return count


class _Trainer:
    """One optimizer step on a global batch (this rank's slice, gradients summed over ranks)."""

    def __init__(self, model: MultiLabelClassifier, loss: str, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.loss_fn = make_loss(loss, model.head_name, model)
        self.mean_loss = getattr(self.loss_fn, "reduction", "mean") != "sum"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.rank, self.world = _rank_world()

    def backward(self, inputs: Tensor | dict[str, Tensor], targets: Tensor, columns: Tensor | None) -> Tensor:
        """Gradients of this rank's slice of the global batch, summed over ranks; returns the loss."""
        n = targets.shape[0]
        local = slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)
        x, y = _slice(inputs, local), targets[local].to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        value = torch.zeros((), device=self.device)
        if y.shape[0]:  # a rank with no sample in a tiny batch still joins the all-reduce
            x = {k: v.to(self.device) for k, v in x.items()} if isinstance(x, dict) else x.to(self.device)
            cols = None if columns is None else columns.to(self.device)  # the per-source label mask
            forward = self.model.forward_features if isinstance(x, dict) else self.model
            logits = forward(x, cols).float()  # only this source's columns are scored
            if cols is not None:
                y = y[:, cols]
                if getattr(self.model.head, "last_cosines", None) is not None:  # the margined MLCD loss reads them
                    self.model.head.last_cosines = self.model.head.last_cosines[..., cols]
            value = self.loss_fn(logits, y) * (y.shape[0] / n if self.mean_loss else 1.0)
            value.backward()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            for p in self.params:
                dist.all_reduce(p.grad)
            dist.all_reduce(value := value.detach().clone())
        return value.detach()

    def step(self, inputs: Tensor | dict[str, Tensor], targets: Tensor, columns: Tensor | None) -> float:
        """One optimizer step; returns the batch's summed loss (a mean loss times the batch size)."""
        value = self.backward(inputs, targets, columns)
        self.optimizer.step()
        return float(value) * (targets.shape[0] if self.mean_loss else 1.0)


def fit(
    model: MultiLabelClassifier,
    train_batches: Sequence[Pass] | Pass | Callable[[int], Iterable[Batch]],
    epochs: int,
    loss: str = "asl",
    lr: float | None = None,
    seed: int = 0,
    log: Callable[[int, float], None] | None = None,
    steps: int | None = None,
    optimizer: str | None = None,
    warmup: int = 1,
    steps_per_epoch: int | None = None,  # accepted for old callers: the schedule counts passes
    select: Callable[[MultiLabelClassifier], float] | None = None,
    select_every: int = 1,
    test_select: Callable[[MultiLabelClassifier], dict[str, float]] | None = None,
) -> FitResult:
    """Train ``model``'s trainable parameters on ``train_batches``: passes run in order every epoch (a bare
    callable is one pass on every column). ``steps`` trains exactly that many optimizer steps instead of
    ``epochs`` epochs (cycling the passes), the cosine sized to the epochs they make.

    Batches are GLOBAL (the same on every rank); inputs are pixels, or cached feature dicts when
    ``model.cacheable``. Returns the mean loss per epoch (over all ranks' samples), the optimizer steps taken
    and the learning-rate trace.

    ``select`` (a validation score, higher is better) is called every ``select_every`` epochs and after the
    last one; the model ends with the weights of the best-scoring epoch (the official code keeps its best epoch;
    here it is chosen on validation data, never on the test set).

    ``test_select`` (the official code's selection: TEST F1@3 by setting, e.g. ZSL and GZSL) is called after every
    epoch; each setting's best epoch and its weights are kept in ``FitResult.official_best`` (the first epoch
    wins a tie, as the official strict ``>``). It never changes the weights the model ends with.
    """
    torch.manual_seed(seed)
    passes = _as_passes(train_batches)
    if steps is not None:
        epochs = math.ceil(_passes_for_steps(passes, steps) / len(passes))
    # CPRFL's official optimizer, OneCycle and EMA (its per-step schedule needs the step count: counted only then)
    official = recipe(model, lambda: steps or _steps_in(passes, epochs), lr)
    opt = official[0] if official else make_optimizer(model, lr, optimizer)
    trainer = _Trainer(model, loss, opt)
    schedule = PassSchedule(opt, t_max=epochs, warmup=warmup) if official is None else None
    result = FitResult()
    best: dict[str, Tensor] | None = None
    totals: dict[int, list[float]] = {}
    model.train()
    for epoch, one in _pass_stream(passes, None if steps is not None else epochs):
        total = totals.setdefault(epoch, [0.0, 0.0])
        for inputs, targets, *columns in one.batches(epoch):
            if steps is not None and result.optimizer_steps >= steps:
                break
            result.lr_trace.append(opt.param_groups[0]["lr"])
            total[0] += trainer.step(inputs, targets, columns[0] if columns else one.columns)
            total[1] += targets.shape[0]
            result.optimizer_steps += 1
            result.steps_by_pass[one.name] = result.steps_by_pass.get(one.name, 0) + 1
            if official:
                official[1].step()  # OneCycle steps per optimizer step
                official[2].update(model)
        if schedule is not None:
            schedule.step()
        done = steps is not None and result.optimizer_steps >= steps
        if one is passes[-1] or done:
            if log is not None and trainer.rank == 0:
                log(epoch, total[0] / max(total[1], 1))
            last = done or (epochs is not None and steps is None and epoch == epochs - 1)
            if select is not None and ((epoch + 1) % select_every == 0 or last):
                best = _validate(model, select, epoch, result, best, official[2] if official else None)
            if test_select is not None:
                _select_on_test(model, test_select, epoch, result, official[2] if official else None)
        if done:
            break
    if official:
        official[2].copy_to(model)  # the official code evaluates (and mlgen saves) the EMA weights
    if best is not None:
        model.load_state_dict(best, strict=False)
    result.history = [total / max(count, 1) for total, count in totals.values()]
    return result


def _trained_state(model: MultiLabelClassifier) -> dict[str, Tensor]:
    """A copy of what training changes (every entry but the frozen parameters)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def _validate(model, select, epoch: int, result: FitResult, best, ema) -> dict[str, Tensor] | None:
    """Score the epoch's weights (the EMA weights where the recipe evaluates those); keep a copy when best."""
    live = _trained_state(model) if ema is not None else None
    if ema is not None:
        ema.copy_to(model)
    score = float(select(model))
    model.train()
    if not result.validation or score > max(s for _, s in result.validation):
        best, result.selected_epoch = _trained_state(model), epoch
    result.validation.append((epoch, score))
    if live is not None:
        model.load_state_dict(live, strict=False)
    return best


def _select_on_test(model, score_of, epoch: int, result: FitResult, ema) -> None:
    """The official selection: score the epoch on the test settings; keep a copy of the weights of each
    setting's best epoch (strictly better only, as the official ``is_best = f1 > best_f1``)."""
    live = _trained_state(model) if ema is not None else None
    if ema is not None:
        ema.copy_to(model)
    scores = {name: float(value) for name, value in score_of(model).items()}
    model.train()
    result.official.append((epoch, scores))
    for name, value in scores.items():
        previous = [s[name] for _, s in result.official[:-1]]
        if not previous or value > max(previous):
            result.official_best[name] = (epoch, _trained_state(model))
    if live is not None:
        model.load_state_dict(live, strict=False)


def _steps_in(passes: list[Pass], epochs: int) -> int:
    """Optimizer steps of ``epochs`` epochs (what a per-step schedule is sized to): the batches are counted."""
    return epochs * sum(sum(1 for _ in one.batches(0)) for one in passes)
