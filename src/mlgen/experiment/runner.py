"""``mlgen experiment``: every arm on every seed, one (seed, arm) cell at a time, resumable.

A cell is finished when ``RUN/experiment/cells/SEED/ARM.json`` exists (written atomically, after its figures):
a rerun skips it, so a killed experiment (even ``kill -9``) redoes at most the cell it was in. A failed arm is
a cell with ``status: failed`` and its error: reported for that seed, never dropped. The settings that shape
the results are recorded in ``RUN/experiment/settings.json``; a rerun with other settings is refused
(``--seeds`` and ``--arms`` may change: more seeds or arms add cells).
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mlgen.config import ClassifierConfig, ExperimentConfig
from mlgen.errors import MlgenError
from mlgen.experiment.arms import Arm, select_arms
from mlgen.experiment.cells import Context, TestSet, run_arm
from mlgen.experiment.data import resolve, test_set
from mlgen.experiment.report import write_report
from mlgen.paths import write_json_atomic

FREE_SETTINGS = ("seeds", "arms")  # may change between runs of one experiment
# The head every trained arm shares (a ``classifier:`` config section overrides it): a linear head started from
# random weights, so that what it knows of the unseen labels comes from the arm's images alone, trained with
# AdamW and no augmentation. Measured on the toy world, one seed, oracle arm (512 real images, 200 steps): the
# official SGD lr 0.002 barely moves a linear head (0.68, vs 0.77 with AdamW), and the official Cutout +
# RandAugment erase or recolour the 4-7 px shapes of 64 px scenes (0.77 with, 0.85 without). A shared-context
# DualCoOp as the shared head learned nothing: its only trainable part is the context, so it cannot learn a
# label whose NAME the text tower does not know (the toy teacher's rare shapes), whatever the images show
# (oracle ZSL 0.39 vs zero-shot 0.69). seen-only still uses it (see arms.py).
DEFAULT_CLASSIFIER = ClassifierConfig(head_init="random", optimizer="adamw", augment=False)


def cell_path(root: Path, seed: int, arm: str) -> Path:
    return root / "cells" / str(seed) / f"{arm}.json"


def _check_settings(root: Path, config: ExperimentConfig, classifier: ClassifierConfig) -> None:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_SETTINGS}
    settings["classifier"] = dataclasses.asdict(classifier)
    path = root / "settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in recorded.keys() | settings.keys() if recorded.get(k) != settings.get(k))
        if changed:
            raise MlgenError(
                f"{path}: setting '{changed[0]}' differs from the recorded experiment "
                f"({recorded.get(changed[0])!r} -> {settings.get(changed[0])!r}): use another --run or restore it"
            )
    else:
        write_json_atomic(path, settings)


def run_cell(ctx: Context, seed: int, arm: Arm) -> dict[str, Any]:
    """One cell's record: its figures, or ``status: failed`` with the error's one line."""
    started = time.perf_counter()
    record: dict[str, Any] = {"seed": seed, "arm": arm.name}
    try:
        record.update(run_arm(ctx, seed, arm), status="ok")
    except Exception as err:  # any failure of an arm is a result to report, not a crash
        line = str(err).splitlines()[0] if str(err) else type(err).__name__
        record.update(status="failed", error=f"{type(err).__name__}: {line}"[:500])
        if not isinstance(err, MlgenError):
            record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def run_experiment(
    run_root: Path,
    config: ExperimentConfig,
    classifier: ClassifierConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every missing (seed, arm) cell, then write results.csv, summary.json, table.md and the plot."""
    setup = resolve(config)
    arms = select_arms(config.arms)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny models on a shared CPU: more threads mostly wait on each other
    classifier = classifier or DEFAULT_CLASSIFIER
    root = run_root / "experiment"
    root.mkdir(parents=True, exist_ok=True)
    _check_settings(root, config, classifier)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(root, config, setup, classifier, TestSet.load(test_set(config, setup, root), setup), device)
    for seed in range(config.seeds):
        for arm in arms:
            path = cell_path(root, seed, arm.name)
            if path.is_file():
                continue
            record = run_cell(ctx, seed, arm)
            write_json_atomic(path, record)  # the cell is finished exactly when this file exists
            log(_cell_line(record))
    cells = [json.loads(cell_path(root, s, a.name).read_text()) for s in range(config.seeds) for a in arms]
    return write_report(root, cells, [a.name for a in arms], config.seeds)


def _cell_line(record: dict[str, Any]) -> str:
    head = f"seed {record['seed']} {record['arm']:<16}"
    if record["status"] != "ok":
        return f"{head} FAILED ({record['seconds']:.0f} s): {record['error']}"
    zsl, gzsl = record["zsl"], record["gzsl"]
    return (
        f"{head} ZSL mAP {zsl['mAP']:.3f}  GZSL mAP {gzsl['mAP']:.3f}  "
        f"({record['images']} train items, {record['steps']} steps, {record['seconds']:.0f} s)"
    )
