"""Bad input to ``mlgen finetune`` ends in one ``mlgen: error:`` line, exit 1, no traceback."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import mlgen
from mlgen.config import FinetuneConfig
from mlgen.errors import MlgenError
from mlgen.finetune.stage import check_config
from mlgen.models.tiny import tiny_sd_dir
from test_finetune import FAST, make_run


def error_line(result) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mlgen: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def both(first: list, second: list) -> list:
    """Two mlgen processes at once (each spends seconds importing torch)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda args: mlgen(*args), [first, second]))


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("prompted"))


def fresh_copy(prompted: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(prompted, run)
    return run


def test_model_without_a_text_encoder(prompted: Path, tmp_path: Path) -> None:
    model = tmp_path / "no-text-encoder"
    shutil.copytree(tiny_sd_dir(), model)
    shutil.rmtree(model / "text_encoder")
    index = json.loads((model / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (model / "model_index.json").write_text(json.dumps(index))
    line = error_line(mlgen("finetune", "--run", fresh_copy(prompted, tmp_path), "--model", model, *FAST))
    assert "has no text encoder" in line


def test_run_without_prompts(prompted: Path, tmp_path: Path) -> None:
    run = fresh_copy(prompted, tmp_path)
    path = run / "prompts" / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pq.read_schema(path)), path)
    missing, empty = both(["finetune", "--run", tmp_path / "empty", *FAST], ["finetune", "--run", run, *FAST])
    assert "stage 'prompts' has not finished" in error_line(missing) and "mlgen prompts" in error_line(missing)
    assert "has no prompts to train on" in error_line(empty)


def test_nan_loss_stops_and_a_resume_with_other_settings_is_refused(prompted: Path, tmp_path: Path) -> None:
    run = fresh_copy(prompted, tmp_path)
    args = ["--size", "32", "--denoising-steps", "2", "--max-train-steps", "5", "--save-every", "1"]
    line = error_line(mlgen("finetune", "--run", run, *args, "--learning-rate", "1e10"))
    assert "loss became NaN/inf at step 2" in line and "step-000001" in line
    checkpoints = run / "finetune" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000001"]  # the last good one is kept

    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_sd_dir(), other_model)
    other_lr, other_model = both(  # each stops before any model is loaded
        ["finetune", "--run", run, *args, "--learning-rate", "1e-3"],
        ["finetune", "--run", run, *args, "--learning-rate", "1e10", "--model", other_model],
    )
    assert "setting 'learning_rate' changed" in error_line(other_lr) and "--overwrite" in error_line(other_lr)
    assert "setting 'model' changed" in error_line(other_model)
    assert [p.name for p in checkpoints.iterdir()] == ["step-000001"]  # nothing was lost

    # A checkpoint that another run's settings made, found in a fresh run.
    other = tmp_path / "other"
    shutil.copytree(prompted, other)
    shutil.copytree(checkpoints, other / "finetune" / "checkpoints")
    line = error_line(mlgen("finetune", "--run", other, *args, "--learning-rate", "1e-3"))
    assert "was made with other settings" in line


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 2, "grad_steps": 3}, "--grad-steps 3 is more than the 2 denoising steps"),
        ({"size": 30}, "--size 30 is not a multiple of 8"),
        ({"mixed_precision": "fp8"}, "setting 'mixed_precision' has an invalid value"),
        ({"lr_scheduler": "warm"}, "setting 'lr_scheduler' has an invalid value"),
        ({"learning_rate": 0.0}, "setting 'learning_rate' has an invalid value"),
    ],
)
def test_bad_settings_are_refused_before_any_work(settings: dict, message: str) -> None:
    with pytest.raises(MlgenError, match=message):
        check_config(FinetuneConfig(**{"model": "tiny", "clip": "tiny", **settings}))
