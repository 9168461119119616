"""Reading a run directory back the way a user would: manifests, then the tars they name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds


def planned_shards(stage_dir: Path) -> list[int]:
    return [s["shard"] for s in json.loads((stage_dir / "plan.json").read_text())["shards"]]


def manifest_keys(stage_dir: Path) -> list[str]:
    keys: list[str] = []
    for shard in planned_shards(stage_dir):
        keys += pq.read_table(stage_dir / f"{shard:05d}.parquet").column("key").to_pylist()
    return keys


def images_by_key(stage_dir: Path) -> dict[str, bytes]:
    """Every sample's image bytes, reading each tar to its end with webdataset."""
    tars = [str(stage_dir / f"{shard:05d}.tar") for shard in planned_shards(stage_dir)]
    images: dict[str, bytes] = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        assert sample["__key__"] not in images, f"duplicate key {sample['__key__']}"
        images[sample["__key__"]] = sample["jpg"]
    return images


def manifest_rows(stage_dir: Path) -> list[dict]:
    """Every planned sample's manifest row (key, prompt, labels, seed), in plan order."""
    rows: list[dict] = []
    for shard in planned_shards(stage_dir):
        rows += pq.read_table(stage_dir / f"{shard:05d}.parquet").to_pylist()
    return rows


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def read_in_chromium(page: Path, script: str, tmp_path: Path) -> tuple[str, Path]:
    """The DOM of ``page`` as headless chromium leaves it after ``script`` (appended to a copy of the page) ran,
    and a screenshot of the page itself."""
    checked = page.with_name("check.html")
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    browser = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    run = {"capture_output": True, "text": True, "timeout": 120}
    dom = subprocess.run([*browser, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()], **run).stdout
    screenshot = tmp_path / "report.png"
    subprocess.run([*browser, f"--screenshot={screenshot}", "--window-size=1000,1400", page.as_uri()], **run)
    return dom, screenshot
