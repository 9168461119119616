"""Modules imported on first use, so that ``mlgen --help`` and a refused command start without torch."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Module ``name``, imported at the first attribute access.

    A proxy, not the standard library's ``LazyLoader``: that one puts the unloaded module in ``sys.modules``,
    where torch._dynamo's scan of the loaded modules touches it and so imports mlgen in the middle of torch's own
    import (a circular import error).
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)
