"""Where mlgen keeps things outside a run directory, and atomic file writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Cache for built-in models (``MLGEN_CACHE`` or ``~/.cache/mlgen``)."""
    root = os.environ.get("MLGEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlgen"
    return Path(root)


def temp_sibling(path: Path) -> Path:
    """A unique temporary name beside ``path``; finished files are renamed over the real name."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` and move ``tmp`` onto ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(folder: Path) -> None:
    """Delete temporary files a killed process left behind (they never hold finished work)."""
    if folder.is_dir():
        for tmp in folder.rglob(".*.tmp-*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def build_dir_atomic(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name and rename it into place (for model caches)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
