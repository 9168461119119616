"""Several processes sharing a stage (torchrun / accelerate): shard ``i`` goes to rank ``i % world``."""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device
    state: Any = None  # accelerate.PartialState when several processes run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object; the value itself with one process)."""
        if self.state is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (plans, overwrites); the others follow once it is done."""
        if not self.is_main:
            self.wait()
        yield
        if self.is_main:
            self.wait()


@cache
def current_ranks() -> Ranks:
    """This process's rank, from the launcher's environment (one process when none is set)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        # Long timeout: ranks meet only around planning and at the end of a stage.
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
        atexit.register(destroy_process_group)
        return Ranks(state.process_index, state.num_processes, state.device, state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Ranks(0, 1, device)


def destroy_process_group() -> None:
    """Ends the default process group while Python still runs (registered at exit; safe to call twice).

    Without it a gloo worker thread can free its last all-reduce after the interpreter began finalizing:
    freeing the work's tensors needs the GIL, a thread that asks for it then is ended by Python, and the
    C++ destructor it was in aborts the process (SIGABRT, "terminate called without an active exception").
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
