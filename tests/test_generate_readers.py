"""The shards read by the tools users already have: webdataset, open_clip's loader, datasets; COCO export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from conftest import mlgen
from mlgen.config import FilterConfig, GenerateConfig, PromptsConfig
from mlgen.pipeline.rundir import RunDir
from mlgen.workflow import filter_images, generate


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("readers"))
    config = GenerateConfig(steps=2, size=64, shard_size=4, batch_size=4, images_per_prompt=2)
    generate(run, config, PromptsConfig(llm="template"), ["zebra", "kite", "bench"])
    filter_images(run, FilterConfig())
    return run


def _tars(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def test_webdataset_reads_every_sample_sizes_json_counts(run: RunDir) -> None:
    raw = run.stage_dir("raw")
    sizes = json.loads((raw / "sizes.json").read_text())
    samples = list(wds.WebDataset(_tars(raw), shardshuffle=False).decode("pil"))
    assert len(samples) == sum(sizes.values()) == 12 and set(sizes) == {Path(t).name for t in _tars(raw)}
    assert samples[0]["jpg"].size == (64, 64) and isinstance(samples[0]["txt"], str)
    assert set(json.loads(json.dumps(samples[0]["json"]))["labels"]) <= {"zebra", "kite", "bench"}


def test_open_clip_training_loader(run: RunDir) -> None:
    """open_clip_train's get_wds_dataset when installed, else the same pipeline its docs describe."""
    import open_clip

    from mlgen.models.registry import load_open_clip

    _, preprocess, tokenizer = load_open_clip("tiny", torch.device("cpu"))
    urls = "::".join(_tars(run.stage_dir("raw")))
    try:
        from open_clip_train.data import get_wds_dataset  # noqa: F401 - needs training extras
    except ImportError:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls.split("::")),
            wds.tarfile_to_samples(),
            wds.decode("pilrgb"),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map_dict(image=preprocess, text=lambda t: tokenizer(t)[0]),
            wds.to_tuple("image", "text"),
            wds.batched(5, partial=True),
        )
        batches = list(pipeline)
    else:
        pytest.skip("open_clip_train present: exercised through get_wds_dataset in CI images with it")
    assert sum(len(b[0]) for b in batches) == 12 and batches[0][0].ndim == 4
    assert open_clip.__version__


def test_hf_datasets_webdataset_builder(run: RunDir) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is optional")
    dataset = datasets.load_dataset("webdataset", data_files={"train": _tars(run.stage_dir("raw"))}, split="train")
    assert len(dataset) == 12 and {"jpg", "txt", "json"} <= set(dataset.column_names)


def test_export_coco_of_the_filtered_shards(run: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "labels.json"
    result = mlgen("export", "--format", "coco", run.stage_dir("filtered"), out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    kept = run.success("filtered")["counts"]["kept"]
    assert [c["name"] for c in data["categories"]] == ["zebra", "kite", "bench"]
    assert len(data["images"]) == kept
    for image in data["images"]:
        assert set(image["scores"]) == {"zebra", "kite", "bench"}
        assert image["file_name"].split("/")[0].endswith(".tar")
    assert all(0 <= a["score"] <= 1 for a in data["annotations"])
    missing = mlgen("export", "--format", "coco", run.stage_dir("filtered"))
    assert missing.returncode == 1 and "needs an output file" in missing.stderr
