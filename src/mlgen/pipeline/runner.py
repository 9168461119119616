"""The resumable stage runner.

A stage plans its work up front as numbered shards and processes one shard at a time. The
runner owns everything else: the plan file and its settings check, which shards are still to
do, which rank does them, the per-shard stats files (written last: a shard is done exactly when
its stats file exists) and the stage's ``_SUCCESS.json`` marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from mlgen import __version__
from mlgen.config import as_dict, output_settings
from mlgen.errors import MlgenError, ShardFailed
from mlgen.paths import remove_stale_temps, write_json_atomic
from mlgen.pipeline.ranks import Ranks, current_ranks
from mlgen.pipeline.rundir import PLAN, SUCCESS, RunDir, stats_path
from mlgen.progress import progress


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class Stage(ABC):
    """One pipeline stage: a plan of shards and the work for one shard."""

    name: ClassVar[str]  # its folder in the run directory
    config_section: ClassVar[str]  # its section in config.yaml
    requires: ClassVar[tuple[str, ...]] = ()  # stages whose _SUCCESS it needs

    def __init__(self, run: RunDir, config: Any) -> None:
        self.run = run
        self.config = config
        self.folder = run.stage_dir(self.name)

    def settings(self) -> dict[str, Any]:
        """What shapes this stage's output: its settings plus the hashes of its inputs."""
        settings = output_settings(self.config)
        for stage in self.requires:
            settings[f"upstream {stage}"] = self.run.require(stage)["config_hash"]
        return settings

    @abstractmethod
    def plan(self) -> list[dict[str, Any]]:
        """The shards, each a JSON-able dict with at least ``shard`` (its number)."""

    def prepare(self, ranks: Ranks) -> None:  # noqa: B027 - optional hook
        """Work that needs the whole input; called on EVERY rank (it may wait for the others) while shards remain."""

    def setup(self, ranks: Ranks) -> None:  # noqa: B027 - optional hook
        """Load models; called once, and only when this rank has shards to do."""

    @abstractmethod
    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        """Write the shard's outputs (atomically) and return its stats (counts are summed)."""

    def finish(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        """After the last shard, on rank 0: merge outputs if needed; return the marker's counts."""
        totals: dict[str, Any] = {}
        for shard_stats in stats:
            for key, value in shard_stats.items():
                if isinstance(value, (int, float)) and key not in ("shard", "seconds"):
                    totals[key] = totals.get(key, 0) + value
        return totals


def run_stage(stage: Stage, overwrite: bool = False, ranks: Ranks | None = None) -> dict[str, Any]:
    """Run the shards of ``stage`` still to do on this rank; return the stage marker when complete."""
    ranks = ranks or current_ranks()
    with _stage_lock(stage, ranks):
        return _run_stage(stage, overwrite, ranks)


@contextlib.contextmanager
def _stage_lock(stage: Stage, ranks: Ranks) -> Iterator[None]:
    """One job per stage at a time: its rank 0 holds the lock for all of its ranks, and tells them whether it got
    it, so that every rank of a refused job stops with the same line (none waits on a rank that left)."""
    with contextlib.ExitStack() as held:
        refused = None
        if ranks.is_main:
            try:
                held.enter_context(stage.run.lock(stage.name))
            except MlgenError as err:
                refused = str(err)
        refused = ranks.from_main(refused)
        if refused:
            raise MlgenError(refused)
        yield


def _run_stage(stage: Stage, overwrite: bool, ranks: Ranks) -> dict[str, Any]:
    started = time.time()
    settings = stage.settings()
    _check_settings(stage, settings, overwrite)  # on every rank, so all of them stop alike
    with ranks.main_first():
        if ranks.is_main:  # the other ranks wait: nobody writes in the folder yet
            for trash in stage.run.root.glob(f".{stage.name}.discarded-*"):
                shutil.rmtree(trash)  # a killed --overwrite
            remove_stale_temps(stage.folder)
            plan = _load_or_make_plan(stage, settings)
            stage.run.record_config(stage.config_section, as_dict(stage.config))
        else:
            plan = json.loads((stage.folder / PLAN).read_text(encoding="utf-8"))
    pending = [s for s in plan["shards"] if not stats_path(stage.folder, s["shard"]).exists()]
    if pending:
        stage.prepare(ranks)
    todo = [s for s in pending if ranks.owns(s["shard"])]
    failed: list[ShardFailed] = []
    if todo:
        stage.setup(ranks)
        for shard in progress(todo, f"{stage.name} shards", "shard", disable=len(todo) < 2):
            shard_started = time.time()
            try:
                stats = stage.run_shard(shard)
            except ShardFailed as err:  # a corrupt input: the other shards still get done
                failed.append(err)
                continue
            stats.update(shard=shard["shard"], seconds=round(time.time() - shard_started, 3))
            write_json_atomic(stats_path(stage.folder, shard["shard"]), stats)  # last: the shard is done
    ranks.wait()
    if ranks.is_main:
        _mark_finished(stage, plan, started)  # not with a failed shard: it has no stats file
    ranks.wait()  # every rank sees the marker before the next stage reads it
    if failed:
        more = f" (and {len(failed) - 1} more failed shards)" if len(failed) > 1 else ""
        raise MlgenError(f"{failed[0]}{more}; the other shards are done, the {stage.name} stage is not complete")
    return stage.run.success(stage.name) or {}


def _mark_finished(stage: Stage, plan: dict[str, Any], started: float) -> None:
    """Write the stage marker if every shard of the plan has its stats file."""
    marker = stage.run.success(stage.name)
    if marker is not None and marker["config_hash"] == plan["config_hash"]:
        return
    paths = [stats_path(stage.folder, s["shard"]) for s in plan["shards"]]
    if not all(p.exists() for p in paths):  # some rank stopped early: the stage is not complete
        return
    all_stats = [json.loads(p.read_text()) for p in paths]
    marker = {
        "stage": stage.name,
        "mlgen_version": __version__,
        "config_hash": plan["config_hash"],
        "shards": len(plan["shards"]),
        "counts": stage.finish(all_stats),
        "seconds": round(time.time() - started, 3),
    }
    write_json_atomic(stage.folder / SUCCESS, marker)


def _recorded_plan(stage: Stage) -> dict[str, Any] | None:
    plan_file = stage.folder / PLAN
    return json.loads(plan_file.read_text(encoding="utf-8")) if plan_file.is_file() else None


def _check_settings(stage: Stage, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse settings that differ from the plan's once some shard is done (work would be lost)."""
    plan = _recorded_plan(stage)
    if plan is None or overwrite or plan["config_hash"] == settings_hash(settings):
        return
    if any(stats_path(stage.folder, s["shard"]).exists() for s in plan["shards"]):
        raise MlgenError(_describe_change(stage.name, plan["settings"], settings))


def _load_or_make_plan(stage: Stage, settings: dict[str, Any]) -> dict[str, Any]:
    """The recorded plan if its settings match; otherwise (checked before) a fresh stage folder."""
    plan = _recorded_plan(stage)
    if plan is not None and plan["config_hash"] == settings_hash(settings):
        return plan
    if plan is not None:  # --overwrite, or nothing finished yet (e.g. a typo'd model name)
        _discard(stage.folder)
    plan = {"stage": stage.name, "config_hash": settings_hash(settings), "settings": settings, "shards": stage.plan()}
    write_json_atomic(stage.folder / PLAN, plan)
    return plan


def _discard(folder: Path) -> None:
    """Remove a stage folder; renamed away first, so a kill mid-delete leaves no half-deleted stage."""
    trash = folder.with_name(f".{folder.name}.discarded-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _describe_change(stage: str, recorded: dict[str, Any], current: dict[str, Any]) -> str:
    changed = sorted(k for k in recorded.keys() | current.keys() if recorded.get(k) != current.get(k))
    name = changed[0] if changed else "?"
    what = (
        f"its input stage '{name.removeprefix('upstream ')}' was redone"
        if name.startswith("upstream ")
        else f"setting '{name}' changed from {recorded.get(name)!r} to {current.get(name)!r}"
    )
    return f"{stage}: {what} since this stage started; pass --overwrite to redo the stage, or restore the setting"
