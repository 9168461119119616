"""``mlgen experiment``: every arm on every seed, one (seed, arm) cell at a time, resumable.

A cell is finished when ``RUN/experiment/cells/SEED/ARM.json`` exists (written atomically, after its figures):
a rerun skips it, so a killed experiment (even ``kill -9``) redoes at most the cell it was in. A failed arm is
a cell with ``status: failed`` and its error: reported for that seed, never dropped. The settings that shape
the results are recorded in ``RUN/experiment/settings.json``; a rerun with other settings is refused
(``--seeds`` and ``--arms`` may change: more seeds or arms add cells).

Seeds are independent, so ``workers`` processes run them at once (each seed's cells in one process, one torch
thread each): on the toy world's tiny models a 2-core CPU runs the experiment in about half the time. The shared
parts (test set, prompt stages) are made first, by this process; a worker dies with it (even after ``kill -9``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch

from mlgen.config import ClassifierConfig, ExperimentConfig
from mlgen.errors import MlgenError
from mlgen.experiment.arms import REFERENCE, Arm, select_arms
from mlgen.experiment.audit import audit_path, audit_seed, pct
from mlgen.experiment.cells import Context, paper_lr, run_arm
from mlgen.experiment.data import resolve
from mlgen.experiment.report import write_pooled_report, write_report
from mlgen.experiment.runs import PROMPTS, shared_prompts
from mlgen.models.builtin import model_identity
from mlgen.paths import write_json_atomic

FREE_SETTINGS = ("seeds", "arms", "workers", "splits")  # may change between runs of one experiment
# The head every trained arm shares (a ``classifier:`` config section overrides it): a linear head started from the
# teacher's text embeddings of the label names (untrained, it is the teacher's zero-shot classifier: what a user of
# `mlgen train-classifier` gets), AdamW at lr 3e-2 without augmentation. The start, the rate and augmentation are
# chosen on validation scenes by bench/tune_experiment.py (README gives the figures): a text-started cosine head has
# unit-norm weights, so it needs a larger rate than a random start to turn at all. A shared-context DualCoOp cannot
# be the shared head: its only trainable part is the context, so it cannot learn a label whose NAME the teacher's
# text tower does not know (the toy teacher's rare shapes); the seen-only and paper arms use it (see arms.py).
DEFAULT_CLASSIFIER = ClassifierConfig(head_init="text", optimizer="adamw", lr=3e-2, augment=False)


def experiment_seeds(config: ExperimentConfig) -> list[int]:
    """The experiment's seeds: ``first_seed`` .. ``first_seed + seeds - 1``. Every draw of a seed (its test,
    validation, seen and oracle scenes, generation, training) is keyed by the seed itself, so seeds 10-19 are
    never the draws of seeds 0-9; ``first_seed`` is recorded in the settings, so one DIR cannot mix ranges."""
    if config.first_seed < 0:
        raise MlgenError(f"--first-seed {config.first_seed}: seeds are 0 or more")
    return list(range(config.first_seed, config.first_seed + config.seeds))


def cell_path(root: Path, seed: int, arm: str) -> Path:
    return root / "cells" / str(seed) / f"{arm}.json"


def _check_settings(root: Path, config: ExperimentConfig, classifier: ClassifierConfig) -> None:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in FREE_SETTINGS}
    settings["classifier"] = dataclasses.asdict(classifier)
    # The models the world's names resolve to, built-in weights by digest: a world whose generator or teacher
    # changed (a new mlgen) must not add cells to an experiment made with the old one.
    setup = resolve(config)
    settings["resolved_clip"] = model_identity(setup.clip, "clip")
    settings["resolved_model"] = model_identity(setup.model, "diffusion")
    settings["resolved_paper_lr"] = paper_lr(config)  # the world's rate is code: a new choice must not mix
    path = root / "settings.json"
    settings = json.loads(json.dumps(settings))  # as JSON stores it: tuples are lists
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        settings["classifier"] = _without_new_defaults(classifier, settings["classifier"], recorded.get("classifier"))
        changed = sorted(k for k in recorded.keys() | settings.keys() if recorded.get(k) != settings.get(k))
        if changed and changed[0] not in recorded:  # a setting this mlgen records and the one that ran did not
            raise MlgenError(
                f"{path}: recorded by an older mlgen that did not record '{changed[0]}' (now "
                f"{settings[changed[0]]!r}): use another --run"
            )
        if changed:
            raise MlgenError(
                f"{path}: setting '{changed[0]}' differs from the recorded experiment "
                f"({recorded.get(changed[0])!r} -> {settings.get(changed[0])!r}): use another --run or restore it"
            )
    else:
        write_json_atomic(path, settings)


def _without_new_defaults(classifier: ClassifierConfig, settings: dict, recorded: dict | None) -> dict:
    """``settings`` less the classifier settings added since the record was made (``config.added``) that still
    have their default: an experiment made before they existed goes on."""
    if not isinstance(recorded, dict):
        return settings
    new = {
        f.name
        for f in dataclasses.fields(classifier)
        if f.metadata.get("omit_when_default") and f.name not in recorded and getattr(classifier, f.name) == f.default
    }
    return {k: v for k, v in settings.items() if k not in new}


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
    """Run every missing (split, seed, arm) cell, then write results.csv, summary.json, table.md and the plot of
    each split, and with several splits the pooled table (``splits.md``). Returns the first split's summary (the
    given ``--unseen``) with the pooled one under ``pooled`` when there are several splits."""
    resolve(config)  # bad labels or models: one error line before anything is written
    experiment_seeds(config)
    classifier = classifier or DEFAULT_CLASSIFIER
    splits = split_labels(config)
    summaries, cells, audits = [], [], []
    for number, unseen in enumerate(splits):
        root = split_root(run_root, number)
        split_config = config if number == 0 else dataclasses.replace(config, unseen=",".join(unseen), splits=1)
        if len(splits) > 1:
            log(f"split {number}: unseen {', '.join(unseen)}")
        summary, split_cells, split_audits = _run_split(root, split_config, classifier, log)
        summaries.append(summary)
        cells += [{**cell, "split": number} for cell in split_cells]
        audits += split_audits
    if len(splits) == 1:
        return summaries[0]
    pooled = write_pooled_report(
        run_root / "experiment", cells, select_arms(config.arms), splits, experiment_seeds(config)
    )
    return {**summaries[0], "pooled": pooled}


def split_root(run_root: Path, number: int) -> Path:
    """Split 0 (the given ``--unseen``) in ``RUN/experiment``, split k in ``RUN/experiment/splits/k``."""
    return run_root / "experiment" if number == 0 else run_root / "experiment" / "splits" / str(number)


def split_labels(config: ExperimentConfig) -> list[list[str]]:
    """The unseen labels of each split: the given ones, then ``splits - 1`` other draws of as many of the
    world's labels from the ``splits`` stream (the other labels are the split's seen ones)."""
    setup = resolve(config)
    if config.splits <= 1:
        return [setup.unseen]
    if setup.world is None or config.seen:
        raise MlgenError("--splits draws unseen labels from the toy world: not with --world none or --seen")
    from mlgen.world.render import SHAPES
    from mlgen.world.streams import stream_rng

    rng = stream_rng("splits", 0)
    splits, tries = [setup.unseen], 0
    while len(splits) < config.splits and tries < 1000:
        tries += 1
        drawn = [SHAPES[i] for i in sorted(rng.choice(len(SHAPES), size=len(setup.unseen), replace=False))]
        if all(set(drawn) != set(other) for other in splits):
            splits.append(drawn)
    if len(splits) < config.splits:
        raise MlgenError(f"--splits {config.splits}: only {len(splits)} distinct splits of {len(setup.unseen)} labels")
    return splits


def _run_split(
    root: Path, config: ExperimentConfig, classifier: ClassifierConfig, log: Callable[[str], None]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    arms = select_arms(config.arms)
    root.mkdir(parents=True, exist_ok=True)
    _check_settings(root, config, classifier)
    seeds = experiment_seeds(config)
    todo = [seed for seed in seeds if _unfinished(root, seed, arms)]
    workers = min(worker_count(config), len(todo))
    if workers > 1:
        _prepare_shared(root, config, arms)
        _run_in_workers(root, config, classifier, todo, workers, log)
    else:
        ctx = _context(root, config, classifier)
        for seed in todo:
            run_seed(ctx, seed, arms, log)
    cells = [json.loads(cell_path(root, s, a.name).read_text()) for s in seeds for a in arms]
    audits = [json.loads(audit_path(root, s).read_text()) for s in seeds if audit_path(root, s).is_file()]
    return write_report(root, cells, [a.name for a in arms], seeds, audits), cells, audits


def _unfinished(root: Path, seed: int, arms: list[Arm]) -> bool:
    """A cell of the seed is missing, or its filter audit (with the mlgen arm)."""
    if any(not cell_path(root, seed, arm.name).is_file() for arm in arms):
        return True
    return any(arm.name == REFERENCE for arm in arms) and not audit_path(root, seed).is_file()


def worker_count(config: ExperimentConfig) -> int:
    """``workers``, or by default one per CPU core on the toy world (tiny models, one thread each) and one with a
    GPU or a user's models (each worker loads every model)."""
    if config.workers is not None:
        return config.workers
    if config.world is None or torch.cuda.is_available():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _context(root: Path, config: ExperimentConfig, classifier: ClassifierConfig) -> Context:
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny models on a shared CPU: more threads mostly wait on each other
    setup = resolve(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Context(root, config, setup, classifier, device=device)


def run_seed(ctx: Context, seed: int, arms: list[Arm], log: Callable[[str], None]) -> None:
    """The seed's missing cells, in the table's order, scored on the seed's own test draw."""
    ctx = ctx.for_seed(seed)
    for arm in arms:
        path = cell_path(ctx.root, seed, arm.name)
        if path.is_file():
            continue
        record = run_cell(ctx, seed, arm)
        write_json_atomic(path, record)  # the cell is finished exactly when this file exists
        log(_cell_line(record))
    if any(arm.name == REFERENCE for arm in arms) and not audit_path(ctx.root, seed).is_file():
        _audit(ctx, seed, log)


def _audit(ctx: Context, seed: int, log: Callable[[str], None]) -> None:
    """The filter audit of the seed's mlgen run (see audit.py); a failure is one line, not a failed experiment."""
    try:
        record = audit_seed(ctx, seed)
    except Exception as err:  # the audit is a diagnosis beside the results: it never stops them
        log(f"seed {seed} filter audit failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return
    if record:
        kept, dropped = record["kept"], record["dropped"]
        log(
            f"seed {seed} filter audit     judge says exactly as asked: kept {pct(kept['exact'])} of "
            f"{kept['images']}, dropped {pct(dropped['exact'])} of {dropped['images']}"
        )


def _prepare_shared(root: Path, config: ExperimentConfig, arms: list[Arm]) -> None:
    """What every seed reads, made once before the workers start: the prompt stages."""
    setup = resolve(config)
    kinds = {PROMPTS[arm.run] for arm in arms if arm.run in PROMPTS}
    if any(arm.kind in ("s3", "text") for arm in arms):
        kinds.add("llm")
    for kind in sorted(kinds):
        shared_prompts(root, config, setup, kind)


def _run_in_workers(
    root: Path,
    config: ExperimentConfig,
    classifier: ClassifierConfig,
    seeds: list[int],
    workers: int,
    log: Callable[[str], None],
) -> None:
    log(f"running {len(seeds)} seeds in {workers} worker processes")
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start) as pool:
        # No progress bars interleaving from several workers: tqdm reads TQDM_DISABLE when it is imported, which
        # in a worker is before its initializer runs, so the workers get it from this process's environment.
        hidden = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        try:
            jobs = [pool.submit(_worker_seed, root, config, classifier, seed) for seed in seeds]
        finally:
            if hidden is None:
                del os.environ["TQDM_DISABLE"]
            else:
                os.environ["TQDM_DISABLE"] = hidden
        try:
            for job in as_completed(jobs):
                job.result()
        except BrokenProcessPool as err:  # a worker was killed (out of memory?): finished cells are kept
            raise MlgenError(f"an experiment worker process died ({err}): rerun the same command to resume") from None


def _worker_start() -> None:
    """In a worker: die with the parent (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_seed(root: Path, config: ExperimentConfig, classifier: ClassifierConfig, seed: int) -> None:
    ctx = _context(root, config, classifier)
    run_seed(ctx, seed, select_arms(config.arms), lambda line: print(line, flush=True))


def _cell_line(record: dict[str, Any]) -> str:
    head = f"seed {record['seed']} {record['arm']:<16}"
    if record["status"] != "ok":
        return f"{head} FAILED ({record['seconds']:.0f} s): {record['error']}"
    zsl, gzsl = record["zsl"], record["gzsl"]
    return (
        f"{head} ZSL mAP {zsl['mAP']:.3f}  GZSL mAP {gzsl['mAP']:.3f}  "
        f"({record['images']} train items, {record['steps']} steps, {record['seconds']:.0f} s)"
    )
