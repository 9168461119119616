"""Two torchrun "nodes" on loopback (c10d rendezvous, one process each) run every stage and give the
one-process result; a rank killed mid-stage leaves the stage incomplete and a rerun completes it; a second
job on a stage whose lock another process holds stops on every node and writes nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import mlgen
from helpers import images_by_key, manifest_keys, planned_shards
from test_generate_accelerate import _free_port

BIN = os.path.dirname(sys.executable)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torchrun's default per worker: the same float kernels everywhere
STAGES = {  # every stage on the tiny models, small enough for seconds per stage
    "prompts": {"llm": "template"},
    "finetune": {"size": 32, "steps": 2, "learning_rate": 1e-3, "max_train_steps": 2, "train_batch_size": 2},
    "generate": {"steps": 2, "size": 64, "shard_size": 2, "batch_size": 2, "images_per_prompt": 2},
    "filter": {},
    "classifier": {"epochs": 2, "source": "raw"},  # raw: tiny CLIP may keep too few images to train on
}
GENERATE = ["--denoising-steps", "2", "--size", "64", "--shard-size", "2", "--batch-size", "2", "--images-per-prompt", "2"]


@contextlib.contextmanager
def launch_nodes(args: list[str], run: Path, log: Path) -> Iterator[list[subprocess.Popen]]:
    """`torchrun --nnodes 2` twice on this machine, as two nodes would each start it: one process per node.

    Each launcher leads its own process group, killed on the way out: a failed test leaves no worker behind."""
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    try:
        for node in range(2):
            command = [f"{BIN}/torchrun", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                       "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mlgen-test",
                       f"{BIN}/mlgen", *args, "--run-dir", str(run)]  # fmt: skip
            with open(log.with_suffix(f".node{node}.log"), "w") as out:
                env = {**os.environ, **ONE_THREAD}
                nodes.append(
                    subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
        yield nodes
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def wait_all(nodes: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    return [node.wait(timeout=timeout) for node in nodes]


def node_logs(log: Path) -> str:
    return "".join(log.with_suffix(f".node{n}.log").read_text()[-2500:] for n in range(2))


def config_file(folder: Path, classes: Path) -> Path:
    path = folder / "mlgen.yaml"
    path.write_text(yaml.safe_dump({"classes": str(classes), **STAGES}))
    return path


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """Every stage (finetune, generate, filter, train-classifier) from one config, in one process."""
    tmp = tmp_path_factory.mktemp("one")
    (tmp / "classes.txt").write_text("zebra\nkite\nsurfboard\n")
    result = mlgen("run", "--config", config_file(tmp, tmp / "classes.txt"), "--run", tmp / "run", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def decisions(stage_dir: Path) -> list[dict]:
    return [
        row
        for s in planned_shards(stage_dir)
        for row in pq.read_table(stage_dir / f"{s:05d}_decisions.parquet").to_pylist()
    ]


@pytest.mark.slow
def test_two_nodes_run_every_stage_as_one_process(one_process: Path, tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("zebra\nkite\nsurfboard\n")
    run, log = tmp_path / "run", tmp_path / "run.log"
    with launch_nodes(["run", "--config", str(config_file(tmp_path, tmp_path / "classes.txt"))], run, log) as nodes:
        assert wait_all(nodes) == [0, 0], node_logs(log)

    te, te_one = (
        load_file(run / "text_encoder" / "model.safetensors"),
        load_file(one_process / "text_encoder" / "model.safetensors"),
    )
    assert te.keys() == te_one.keys() and all(torch.equal(te[k], te_one[k]) for k in te)  # finetune
    assert len(planned_shards(run / "raw")) == 6  # 6 label sets x 2 images / 2 per shard: 3 shards per node
    assert manifest_keys(run / "raw") == manifest_keys(one_process / "raw")
    assert images_by_key(run / "raw") == images_by_key(one_process / "raw")  # generate, byte for byte
    assert decisions(run / "filtered") == decisions(one_process / "filtered")  # filter: scores and decisions
    assert images_by_key(run / "filtered") == images_by_key(one_process / "filtered")
    head, head_one = (
        load_file(run / "classifier" / "model.safetensors"),
        load_file(one_process / "classifier" / "model.safetensors"),
    )
    assert head.keys() == head_one.keys() and head
    # Gradients are summed over the nodes (all-reduce): equal up to float addition order.
    assert all(torch.allclose(head[k], head_one[k], atol=1e-5, rtol=1e-4) for k in head)
    for stage in ("prompts", "finetune", "raw", "filtered", "classifier"):
        assert (run / stage / "_SUCCESS.json").is_file(), stage


def stage_inputs(one_process: Path, run: Path) -> None:
    """A run holding the one-process run's prompts and fine-tuned text encoder: generate comes next."""
    shutil.copytree(one_process, run, ignore=shutil.ignore_patterns("raw", "filtered", "classifier", "cache", ".*"))


def kill_worker(nodes: list[subprocess.Popen], rank: int) -> None:
    """SIGKILL the worker process that torchrun started as global rank ``rank`` (the launchers stay)."""
    import psutil

    for node in nodes:
        for child in psutil.Process(node.pid).children():
            if child.environ().get("RANK") == str(rank):
                child.kill()
                return
    raise AssertionError(f"no worker with rank {rank}")


@pytest.mark.slow
def test_a_rank_killed_mid_stage_leaves_it_incomplete_and_a_rerun_completes_it(one_process: Path, tmp_path: Path):
    run, log = tmp_path / "run", tmp_path / "kill.log"
    stage_inputs(one_process, run)
    with launch_nodes(["generate", *GENERATE], run, log) as nodes:
        deadline = time.time() + 300
        while not (run / "raw" / "00001_stats.json").exists():  # rank 1's first shard (of 1, 3, 5) is done
            assert all(node.poll() is None for node in nodes), node_logs(log)
            assert time.time() < deadline, node_logs(log)
            time.sleep(0.01)
        kill_worker(nodes, rank=1)
        codes = wait_all(nodes, timeout=120)  # rank 0 does not wait forever for its lost peer
        assert all(code != 0 for code in codes), node_logs(log)
    raw = run / "raw"
    assert not (raw / "_SUCCESS.json").exists()
    assert not (raw / "00005_stats.json").exists()  # rank 1's last shard: never started

    result = mlgen("generate", "--run", run, *GENERATE, env=ONE_THREAD)  # any number of processes may resume
    assert result.returncode == 0, result.stderr[-3000:]
    assert (raw / "_SUCCESS.json").exists()
    assert manifest_keys(raw) == manifest_keys(one_process / "raw")
    assert images_by_key(raw) == images_by_key(one_process / "raw")


HOLD_LOCK = """
import sys
from mlgen.pipeline.rundir import RunDir
with RunDir(sys.argv[1]).lock("raw"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


@pytest.mark.slow
def test_a_job_on_a_locked_stage_stops_on_every_node_and_writes_nothing(one_process: Path, tmp_path: Path):
    run, log = tmp_path / "run", tmp_path / "lock.log"
    stage_inputs(one_process, run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with launch_nodes(["generate", *GENERATE], run, log) as nodes:
            codes = wait_all(nodes, timeout=200)
        assert all(code != 0 for code in codes), node_logs(log)  # the rank without the lock does not hang
        line = f"mlgen: error: another mlgen process is running stage 'raw' in {run}"
        for node in range(2):  # both nodes' processes stop with the line, not a broken-barrier traceback
            text = log.with_suffix(f".node{node}.log").read_text()
            assert line in text and "Traceback" not in text.split(line)[0], text[-2500:]
        assert not (run / "raw").exists()  # nothing planned, nothing written
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait()
    result = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(run)], input="", capture_output=True, text=True)
    assert result.stdout == "held\n", result.stderr[-2000:]
