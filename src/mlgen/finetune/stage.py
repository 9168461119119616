"""The fine-tuning stage: one shard (the whole training run), resumable from its checkpoints.

Every rank trains (data parallel): the global batch of a step is fixed by the seed and the step
number, rank ``r`` renders its images ``r, r + world, ...`` and the gradients are summed over
ranks, so any number of ranks gives the one-process result. A sample's prompt and noise depend
on (seed, step, index) alone, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from mlgen.config import FinetuneConfig
from mlgen.errors import MlgenError
from mlgen.finetune import checkpoint as ckpt
from mlgen.finetune.model import (
    add_lora,
    check_text_encoder,
    clip_logits,
    discriminative_loss,
    filter_rules,
    load_parts,
)
from mlgen.finetune.model import render as render_images
from mlgen.finetune.names import best_name_setting, best_names_from_mapping
from mlgen.finetune.output import remove_stale_output, save_text_encoder
from mlgen.generate.diffusion import sample_seed
from mlgen.generate.draw import LABEL_DRAW, draw_label_set
from mlgen.labels import alias_setting, aliases_from_mapping
from mlgen.models.registry import check_clip_weights
from mlgen.paths import write_atomic, write_text_atomic
from mlgen.pipeline.ranks import Ranks, current_ranks
from mlgen.pipeline.rundir import PLAN, RunDir
from mlgen.pipeline.runner import Stage, _describe_change, run_stage, settings_hash
from mlgen.progress import progress

LOG_FIELDS = ["step", "loss", "pass_share", "lr"]


@dataclasses.dataclass(frozen=True)
class EveryRank(Ranks):
    """Data parallel training: every rank works on the one shard (the runner gives shard i to rank i % world)."""

    def owns(self, shard: int) -> bool:
        return True


def check_config(c: FinetuneConfig) -> None:
    checks = {
        "learning_rate": c.learning_rate > 0,
        "adam_weight_decay": c.adam_weight_decay >= 0,
        "max_grad_norm": c.max_grad_norm > 0,
        "lr_scheduler": c.lr_scheduler in ("constant", "linear", "cosine"),
        "mixed_precision": c.mixed_precision in ("auto", "no", "fp16", "bf16"),
    }
    for name, ok in checks.items():
        if not ok:
            raise MlgenError(f"setting '{name}' has an invalid value: {getattr(c, name)!r}")
    if c.grad_steps is not None and c.grad_steps > c.steps:
        raise MlgenError(f"--grad-steps {c.grad_steps} is more than the {c.steps} denoising steps (--steps)")
    if c.size % 8:
        raise MlgenError(f"--size {c.size} is not a multiple of 8 (the VAE's latent grid)")


class FinetuneStage(Stage):
    name = "finetune"
    config_section = "finetune"
    requires = ("prompts",)

    def __init__(self, run: RunDir, config: FinetuneConfig) -> None:
        self.classes = run.classes()
        # The aliases and best names are checked against the labels (a config file's settings too) and recorded
        # normalised: the names the loss reads are the setting, not the file they came from.
        self.aliases = aliases_from_mapping(config.label_aliases, "setting 'label_aliases'", self.classes)
        self.best_names = best_names_from_mapping(config.best_names, "setting 'best_names'", self.classes, self.aliases)
        normalised = {"label_aliases": alias_setting(self.aliases), "best_names": best_name_setting(self.best_names)}
        super().__init__(run, dataclasses.replace(config, **normalised))
        self.checkpoints = self.folder / "checkpoints"

    def settings(self) -> dict[str, Any]:
        # the draw rule shapes every batch: a checkpoint trained under another rule is not resumed
        return {**super().settings(), "label_draw": LABEL_DRAW}

    def plan(self) -> list[dict[str, Any]]:
        return [{"shard": 0, "kind": "train", "steps": self.config.max_train_steps}]

    def prompts(self) -> list[dict[str, Any]]:
        rows = pq.read_table(self.run.stage_dir("prompts") / "prompts.parquet").to_pylist()
        if not rows:
            raise MlgenError(f"{self.run.root} has no prompts to train on: run `mlgen prompts --classes FILE` first")
        return rows

    def setup(self, ranks: Ranks) -> None:
        c = self.config
        self.ranks = ranks
        if c.train_batch_size % ranks.world_size:
            raise MlgenError(
                f"--train-batch-size {c.train_batch_size} does not split over {ranks.world_size} processes"
            )
        self.rows = self.prompts()
        self.parts = load_parts(
            c.model,
            c.clip,
            self.classes,
            ranks.device,
            c.mixed_precision,
            c.gradient_checkpointing,
            self.aliases,
            self.best_names,
        )
        if c.lora_rank:
            self.parts.text_encoder = add_lora(self.parts.text_encoder, c.lora_rank, c.lora_alpha, c.seed)
        else:
            self.parts.text_encoder.requires_grad_(True)
        self.params = [p for p in self.parts.text_encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            weight_decay=c.adam_weight_decay,
            eps=c.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            c.lr_scheduler, self.optimizer, num_warmup_steps=0, num_training_steps=c.max_train_steps
        )
        self.scaler = torch.amp.GradScaler(ranks.device.type, enabled=self.parts.amp == torch.float16)
        self.hash = settings_hash(self.settings())

    # --- one step -------------------------------------------------------------------------------------------

    def batch(self, step: int) -> list[tuple[int, dict[str, Any]]]:
        """This rank's (index in the global batch, prompt row) pairs of ``step``: fixed by seed and step."""
        rng = np.random.default_rng([self.config.seed, step])
        picks = [self._draw(rng) for _ in range(self.config.train_batch_size)]
        return [(i, row) for i, row in enumerate(picks) if i % self.ranks.world_size == self.ranks.rank]

    def _draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """The official draw (two picks, a repeat dropped, one redraw: a one-label image is about 1/n²), then one
        of that set's prompts; a draw with no prompts (an excluded pair) is redrawn, then any prompt is taken."""
        by_set = getattr(self, "_by_set", None)
        if by_set is None:
            by_set = self._by_set = {}
            for row in self.rows:
                by_set.setdefault(frozenset(row["labels"]), []).append(row)
        for _ in range(100):
            rows = by_set.get(frozenset(draw_label_set(rng, self.classes)))
            if rows:
                return rows[int(rng.integers(len(rows)))]
        return self.rows[int(rng.integers(len(self.rows)))]

    def requested(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        index = {label: i for i, label in enumerate(self.classes)}
        mask = torch.zeros(len(rows), len(self.classes), dtype=torch.bool, device=self.ranks.device)
        for r, row in enumerate(rows):
            mask[r, [index[label] for label in row["labels"]]] = True
        return mask

    def image_loss(self, step: int, index: int, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, passes the exact-set rule) of one rendered training image."""
        c, parts = self.config, self.parts
        generator = torch.Generator("cpu").manual_seed(sample_seed(c.seed, step, index))
        with torch.autocast(parts.device.type, dtype=parts.amp or torch.float32, enabled=parts.amp is not None):
            images = render_images(
                parts, [row["text"]], [row["negative_text"]], generator, c.steps, c.size, c.guidance, c.grad_steps
            )
            logits = clip_logits(parts, images)
        requested = self.requested([row])
        loss, probs = discriminative_loss(logits, requested)
        _, exact_set_keep = filter_rules()
        return loss, exact_set_keep(probs.detach(), requested).float().sum()

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss, share passing the filter rule)."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(2, dtype=torch.float64, device=self.ranks.device)
        for index, row in self.batch(step):  # one image at a time: the memory of batch 1 at any batch size
            loss, passed = self.image_loss(step, index, row)
            self.scaler.scale(loss / c.train_batch_size).backward()
            totals += torch.stack([loss.detach().double(), passed.double().to(totals.device)])
        if self.ranks.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
            for p in self.params:  # each rank holds its images' share of the batch mean: sum them
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        loss, share = (totals / c.train_batch_size).tolist()
        if not math.isfinite(loss):
            self.fail(step, "the loss")
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16 scaling skips such steps itself
            self.fail(step, "the gradient")
        self.lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        return loss, share

    def fail(self, step: int, what: str) -> None:
        saved = ckpt.checkpoints(self.checkpoints)
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved yet"
        raise MlgenError(
            f"finetune: {what} became NaN/inf at step {step}; stopped, {kept} "
            "(lower --learning-rate or --max-grad-norm, or try --mixed-precision no)"
        )

    # --- the run --------------------------------------------------------------------------------------------

    def resume(self) -> ckpt.TrainState:
        """Restore the newest checkpoint, if any; one clear line when it belongs to another run."""
        saved = ckpt.checkpoints(self.checkpoints)
        if not saved:
            return ckpt.TrainState()
        meta = ckpt.read_meta(saved[-1])
        if meta.get("settings_hash") != self.hash:
            raise MlgenError(
                f"finetune: checkpoint {saved[-1]} was made with other settings (model {meta.get('model')!r}); "
                "pass --overwrite to start again, or restore the settings"
            )
        meta = ckpt.load(
            saved[-1], self.parts.text_encoder, self.optimizer, self.lr_scheduler, self.scaler, self.ranks.device
        )
        print(f"finetune: resuming after step {meta['step']} from {saved[-1]}", flush=True)
        return ckpt.TrainState(step=meta["step"], log=meta["log"], window=meta["window"])

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        c, main = self.config, self.ranks.is_main
        if main:
            ckpt.remove_stale(self.checkpoints)
            remove_stale_output(self.run.root / "text_encoder")
        self.ranks.wait()
        state = self.resume()
        steps = range(state.step + 1, c.max_train_steps + 1)
        for step in progress(steps, "finetune", "step", disable=not main or len(steps) < 2):
            state.window.append(list(self.train_step(step)))
            state.step = step
            if step % c.log_every == 0 or step == c.max_train_steps:
                self.log_row(state)
            if main and (step % c.save_every == 0 or step == c.max_train_steps):
                self.save_checkpoint(state)
        if main:
            info = {
                "base_model": c.model,
                "settings_hash": self.hash,
                "steps": c.max_train_steps,
                "lora_rank": c.lora_rank,
            }
            save_text_encoder(self.parts.text_encoder, self.run.root / "text_encoder", info)
        self.ranks.wait()  # the stats file (written after this) must not appear before the output
        last = state.log[-1] if state.log else {}
        return {"steps": c.max_train_steps, "final_loss": last.get("loss"), "final_pass_share": last.get("pass_share")}

    def log_row(self, state: ckpt.TrainState) -> None:
        """A log.csv row: the mean loss and pass share of the steps since the previous row."""
        losses, shares = zip(*state.window, strict=True)
        state.log.append(
            {"step": state.step, "loss": float(np.mean(losses)), "pass_share": float(np.mean(shares)), "lr": self.lr}
        )
        state.window = []
        if self.ranks.is_main:
            self.write_log(state.log)

    def save_checkpoint(self, state: ckpt.TrainState) -> None:
        meta = {"settings_hash": self.hash, "model": self.config.model, "log": state.log, "window": state.window}
        ckpt.save(
            self.checkpoints,
            state.step,
            self.parts.text_encoder,
            self.optimizer,
            self.lr_scheduler,
            self.scaler,
            meta,
            self.config.checkpoints_total_limit,
        )

    def finish(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: v for k, v in stats[0].items() if k not in ("shard", "seconds") and v is not None}

    def write_log(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.folder / "log.csv", buffer.getvalue())
        write_atomic(self.folder / "log.png", lambda tmp: plot_log(rows, tmp))


def plot_log(rows: list[dict[str, Any]], out: Path) -> None:
    """Loss and share of training images passing the exact-set rule, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.plot(steps, [r["loss"] for r in rows], marker=".")
    top.set_ylabel("loss (ASL)")
    bottom.plot(steps, [r["pass_share"] for r in rows], marker=".", color="tab:green")
    bottom.set_ylabel("share passing filter")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_xlabel("step")
    fig.suptitle("mlgen finetune")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=80)
    plt.close(fig)


def finetune(run: RunDir, config: FinetuneConfig, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune the text encoder on the run's prompts; writes ``RUN/text_encoder/``."""
    check_config(config)
    run.require("prompts")
    check_text_encoder(config.model)  # a model without a text encoder fails before any loading
    check_clip_weights(config.clip)
    stage = FinetuneStage(run, config)
    _refuse_other_checkpoints(stage, overwrite)
    return run_stage(stage, overwrite, every_rank())


def every_rank() -> EveryRank:
    """This process's ranks, each of which trains on the one shard."""
    ranks = current_ranks()
    return EveryRank(**{f.name: getattr(ranks, f.name) for f in dataclasses.fields(ranks)})


def _refuse_other_checkpoints(stage: FinetuneStage, overwrite: bool) -> None:
    """The runner replans a stage with no finished shard; here that would silently drop checkpoints."""
    plan_file = stage.folder / PLAN
    if overwrite or not plan_file.is_file() or not ckpt.checkpoints(stage.checkpoints):
        return
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    settings = stage.settings()
    if plan["config_hash"] != settings_hash(settings):
        raise MlgenError(_describe_change(stage.name, plan["settings"], settings))
