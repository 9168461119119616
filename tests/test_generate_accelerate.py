"""mlgen reads the rank variables ``accelerate launch`` sets (its CPU multi-process mode starts only one
process on this machine, so the two processes are started here with the environment it would give them)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

PROBE = (
    "from mlgen.pipeline.ranks import current_ranks; r = current_ranks(); "
    "print(r.rank, r.world_size, r.device.type, [s for s in range(6) if r.owns(s)], flush=True); r.wait()"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_environment_gives_ranks_and_shards() -> None:
    port = str(_free_port())
    processes = []
    for rank in range(2):
        env = {  # what `accelerate launch --multi_gpu --num_processes 2` exports to each process
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "ACCELERATE_MIXED_PRECISION": "no",
            "ACCELERATE_USE_CPU": "true",
            "ACCELERATE_DYNAMO_BACKEND": "NO",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-1500:] for _, err in outputs]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outputs)
    assert lines == ["0 2 cpu [0, 2, 4]", "1 2 cpu [1, 3, 5]"]
