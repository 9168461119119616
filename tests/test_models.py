"""Built-in models: the tiny ones are deterministic and cached; the embedded LLM writes usable prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlgen.config import PromptsConfig
from mlgen.errors import MlgenError
from mlgen.models import tiny
from mlgen.models.registry import diffusers_folder, open_clip_name
from mlgen.prompts.llm import TransformersWriter, mentions


def test_tiny_models_build_identically_and_are_cached(tmp_path: Path, monkeypatch) -> None:
    folders = []
    for name in ("a", "b"):
        monkeypatch.setenv("MLGEN_CACHE", str(tmp_path / name))
        folders.append((tiny.tiny_sd_dir(), tiny.tiny_clip_dir()))
    for first, second in zip(*folders, strict=True):
        for weights in first.rglob("*.safetensors"):
            a, b = load_file(weights), load_file(second / weights.relative_to(first))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = (folders[0][0] / "model_index.json").stat().st_mtime_ns
    monkeypatch.setenv("MLGEN_CACHE", str(tmp_path / "a"))
    assert tiny.tiny_sd_dir() == folders[0][0]
    assert (folders[0][0] / "model_index.json").stat().st_mtime_ns == before  # reused, not rebuilt
    assert not list((tmp_path / "a").glob(".*tmp*"))


def test_tiny_tokenizer_matches_open_clip() -> None:
    import open_clip
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny.tiny_sd_dir() / "tokenizer")
    text = "A zebra next to a surfboard, on the beach."
    ids = tokenizer(text).input_ids
    assert ids == open_clip.tokenize([text])[0][: len(ids)].tolist()
    assert len(tokenizer) == 49408


def test_unknown_model_names_fail_with_one_line() -> None:
    with pytest.raises(MlgenError, match="not found"):
        diffusers_folder("no-such-org/no-such-model")
    with pytest.raises(MlgenError, match="unknown CLIP model"):
        open_clip_name("NoSuchArch/openai")
    with pytest.raises(MlgenError, match="names no weights"):
        open_clip_name("ViT-B-32")
    assert open_clip_name("ViT-B-32/openai") == ("ViT-B-32", "openai")


def test_embedded_llm_writes_prompts_that_name_the_labels() -> None:
    writer = TransformersWriter("smollm2", PromptsConfig(max_new_tokens=48), torch.device("cpu"))
    sets = [("dog", "bicycle"), ("cat",)]
    prompts = writer.scene_prompts(sets, n=2, seed=0)
    for label_set, chosen in zip(sets, prompts, strict=True):
        assert 1 <= len(chosen) <= 2
        for prompt in chosen:
            assert all(mentions(prompt.text, label) for label in label_set)
    assert any(p.source == "llm:smollm2" for chosen in prompts for p in chosen)
    synonyms = writer.synonyms(["dog"], 3, seed=0, all_labels=["dog", "cat"])[0]
    assert "cat" not in synonyms and "dog" not in synonyms and len(synonyms) <= 3
