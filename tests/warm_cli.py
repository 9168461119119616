"""Run the ``mlgen`` command in a real process forked from a server that has already imported torch & co.

A fresh interpreter spends 5-20 s importing torch, open_clip and diffusers on this 2-core CPU, and the
suite runs about a hundred commands. multiprocessing's forkserver imports them once (``PRELOAD``)
and forks a child per command. The child is still its own process: it runs ``mlgen.cli.app.main`` with
its own argv, working folder and environment, writes to its own stdout and stderr, runs its exit
handlers, and ends with the command's exit status (negative when a signal killed it), as
``subprocess.run`` reports it. Only module imports are shared. Tests about what a fresh process imports,
or that send signals, start a fresh interpreter instead.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

# The slow imports of prompts, generate, filter and train-classifier (``python -X importtime -m mlgen ...``).
# Installed module names only: Python 3.11's forkserver ignores the parent's sys.path. A module missing
# here is imported by the command itself.
PRELOAD = [
    "torch",
    "open_clip",
    "pandas",
    "pyarrow.dataset",
    "transformers",
    "diffusers.pipelines.auto_pipeline",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "sentence_transformers",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "mlgen.cli.app",
    "mlgen.workflow",
    "mlgen.classifiers.stage",
    "mlgen.filters.stage",
    "mlgen.generate.stage",
    "mlgen.prompts.stage",
]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _child(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The forked process: become ``python -m mlgen ARGS`` run in ``cwd`` with ``env``, output to files."""
    atexit._clear()  # the server's own exit handlers (from its imports) are not this command's to run
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for path, fd in ((out, 1), (err, 2)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    if "OMP_NUM_THREADS" in env:  # OpenMP read it when the server imported torch: apply a per-command value
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [sys.executable, *args]
    try:
        runpy.run_module("mlgen", run_name="__main__", alter_sys=True)  # what ``python -m mlgen`` does
    finally:
        atexit._run_exitfuncs()  # a forked child ends with os._exit, which skips them


def run(args: list[str], cwd: Path | None, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run([python, -m, mlgen, *args], capture_output=True, text=True)`` in a warm child."""
    with tempfile.TemporaryDirectory(prefix="warm-cli-") as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        out.touch()
        err.touch()
        process = _CONTEXT.Process(target=_child, args=(args, str(cwd or os.getcwd()), env, str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["mlgen", *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "mlgen", *args], process.exitcode, out.read_text(), err.read_text()
        )
