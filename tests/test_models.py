"""Built-in models: the tiny ones are deterministic and cached; the embedded LLM writes usable prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlgen.errors import MlgenError
from mlgen.models import tiny
from mlgen.models.registry import diffusers_folder, open_clip_name
from mlgen.prompts.backends import ChatRequest, RowSampler, TransformersBackend, shared_prefix_length
from mlgen.prompts.instructions import load_instruction, scene_fields
from mlgen.prompts.validate import mentions


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
    with pytest.raises(MlgenError, match=r"no-such-org/no-such-model.* cannot be loaded"):
        diffusers_folder("no-such-org/no-such-model")
    with pytest.raises(MlgenError, match="unknown CLIP model"):
        open_clip_name("NoSuchArch/openai")
    with pytest.raises(MlgenError, match="names no weights"):
        open_clip_name("ViT-B-32")
    assert open_clip_name("ViT-B-32/openai") == ("ViT-B-32", "openai")


def test_embedded_llm_answers_depend_on_the_request_seed_not_the_batch() -> None:
    backend = TransformersBackend("smollm2", torch.device("cpu"), batch_size=3)
    instruction = load_instruction("mlgen")
    requests = [
        ChatRequest(instruction.render(scene_fields(labels, 1)), 0.6, 0.9, 24, seed)
        for labels, seed in ((("dog", "bicycle"), 1), (("cat",), 2), (("dog", "bicycle"), 3))
    ]
    batched = backend.complete(requests)
    backend.batch_size = 1
    alone = backend.complete(requests[::-1])[::-1]
    assert batched == alone  # a request's answer does not depend on its batch or position
    backend.batch_size, backend.reuse_prefix = 3, False
    assert backend.complete(requests) == batched  # encoding the shared instruction once changes no answer
    assert batched[0] != batched[2]  # another seed, another answer
    assert any(mentions(answer, "dog") for answer in batched)  # the few-shot instruction is followed


def test_shared_prefix_leaves_every_request_a_token_of_its_own() -> None:
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7], [7, 8]]) == 0
    assert shared_prefix_length([[1, 2], [3, 4]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one request: no separate prefix pass


def test_row_sampler_draws_from_the_whole_nucleus_when_it_reaches_past_the_candidates() -> None:
    flat = torch.zeros(400, 2000)  # uniform: the top-p 0.9 nucleus holds ~1800 tokens, far past 256 candidates
    drawn = RowSampler(list(range(400)), 1.0, 0.9)(torch.zeros(400, 1), flat).argmax(-1)
    assert drawn.unique().numel() > 256
    peaked = torch.full((8, 2000), -10.0)
    peaked[:, 7] = 10.0  # one token holds nearly all the mass: it is the whole nucleus
    assert RowSampler(list(range(8)), 0.6, 0.9)(torch.zeros(8, 1), peaked).argmax(-1).eq(7).all()
