"""fit(): learns on a toy batch, alternates sources, and 2 torchrun ranks equal 1 process (same global batch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = r"""
import os, sys
import open_clip, torch, torch.distributed as dist
from safetensors.torch import save_file
from mlgen.classifiers.model import build_classifier
from mlgen.classifiers.train import alternating, fit
from mlgen.models.registry import open_clip_name
from mlgen.pipeline.ranks import destroy_process_group

torch.set_num_threads(1)
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
name = open_clip_name("tiny")[0]
model = build_classifier(open_clip.create_model(name), open_clip.get_tokenizer(name), ["a", "b", "c"], sys.argv[2])
g = torch.Generator().manual_seed(1)
pixels = torch.randn(6, 3, 64, 64, generator=g)
targets = torch.tensor([[1, 0, 1]]).repeat(6, 1)  # learnable: a random-weight CLIP gives near-identical features
features = model.frozen_features(pixels)
real = lambda epoch: [({k: v[i:i + 3] for k, v in features.items()}, targets[i:i + 3]) for i in (0, 3)]
synthetic = lambda epoch: [({k: v.flip(0) for k, v in features.items()}, targets.flip(0))]
history = fit(model, alternating(real, synthetic), epochs=3, loss="asl", lr=0.05, optimizer="adamw", warmup=0).history
if int(os.environ.get("RANK", 0)) == 0:
    save_file(model.trainable_state(), sys.argv[1])
    assert history[-1] < history[0], history
    print("history", history)
destroy_process_group()  # gloo's threads end before Python finalizes (else a rank can die with SIGABRT)
"""


def _run(cmd: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
# linear only: CPRFL has dropout, whose random masks differ between 1 and 2 processes
@pytest.mark.parametrize("head", ["linear"])
def test_two_ranks_equal_one_process(tmp_path: Path, head: str) -> None:
    from safetensors.torch import load_file

    (tmp_path / "fit_script.py").write_text(SCRIPT)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun
    _run([sys.executable, "fit_script.py", str(tmp_path / "one.safetensors"), head], tmp_path)
    _run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "fit_script.py", str(tmp_path / "two.safetensors"), head],
        tmp_path,
    )
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and one
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
