"""Progress that reads well on a terminal and in a log file.

On a terminal: a tqdm bar. Anywhere else (a file, CI, Slurm): one plain line now and then (done/total,
rate, ETA) every ``LOG_SECONDS`` seconds or ``LOG_PERCENT`` percent, and one at the end; no carriage
returns, so a log holds whole lines only. Inner bars (``inner=True``: batches within a shard) are shown on a
terminal only.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

LOG_SECONDS = 60.0
LOG_PERCENT = 10


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(
    items: Iterable[T], desc: str, unit: str = "it", disable: bool = False, inner: bool = False
) -> Iterable[T]:
    """``items`` with progress on stderr: a bar on a terminal, plain lines in a log (TQDM_DISABLE: none)."""
    disable = disable or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
    if on_terminal():
        return tqdm(items, desc=desc, unit=unit, disable=disable, leave=not inner)
    if disable or inner:
        return items
    return LogLines(items, desc, unit)


class LogLines:
    """Iterate ``items``, printing a line at least every LOG_SECONDS seconds or LOG_PERCENT percent."""

    def __init__(self, items: Iterable[T], desc: str, unit: str) -> None:
        self.items, self.desc, self.unit = items, desc, unit
        self.total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[T]:
        started = last_time = time.monotonic()
        last_step = done = 0
        for item in self.items:
            yield item
            done += 1
            now = time.monotonic()
            step = done * 100 // self.total // LOG_PERCENT if self.total else 0
            if now - last_time >= LOG_SECONDS or step > last_step:
                last_time, last_step = now, step
                if done != self.total:
                    self.line(done, now - started)
        self.line(done, time.monotonic() - started)

    def set_postfix(self, **_: object) -> None:
        """tqdm's per-item figures: not logged."""

    def line(self, done: int, elapsed: float) -> None:
        text = tqdm.format_meter(done, self.total, elapsed, prefix=self.desc, unit=self.unit, ncols=0)
        print(" ".join(text.split()), file=sys.stderr, flush=True)
