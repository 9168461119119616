"""The prompt stage: label sets, instructions, validation, the request cache (kill -9), a real server, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import mlgen
from mlgen.errors import MlgenError
from mlgen.prompts.backends import ChatRequest, RequestCache, request_seed
from mlgen.prompts.composer import balanced_sets, compose_sets, explicit_sets
from mlgen.prompts.instructions import answer_lines, load_instruction, objects_phrase, scene_fields
from mlgen.prompts.validate import Embedder, PromptValidator, mentions

LABELS = ["zebra", "surfboard", "hair drier", "teddy bear", "kite", "bear"]


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlgen: error: "), result.stderr
    return lines[0]


def test_balanced_sets_cover_every_label_about_equally() -> None:
    sets = balanced_sets(LABELS, max_size=3, sets_per_label=4, seed=0, exclude=(("zebra", "kite"),))
    counts = Counter(label for s in sets for label in s)
    assert set(counts) == set(LABELS) and max(counts.values()) - min(counts.values()) <= 2
    assert all(1 <= len(s) <= 3 for s in sets) and len(set(sets)) == len(sets)
    assert not any({"zebra", "kite"} <= set(s) for s in sets)
    assert sets == balanced_sets(LABELS, 3, 4, seed=0, exclude=(("zebra", "kite"),))  # deterministic
    with pytest.raises(MlgenError, match="larger than the number of labels"):
        balanced_sets(LABELS, 7, 2, seed=0)
    assert explicit_sets(LABELS, (("kite", "zebra", "kite"), ("zebra", "kite"))) == [("zebra", "kite")]
    with pytest.raises(MlgenError, match="'dog', which is not in the classes file"):
        compose_sets(LABELS, (), None, 1, (("zebra", "dog"),), 0)


def test_instructions_are_checked_and_rendered(tmp_path: Path) -> None:
    paper = load_instruction("paper")
    turns = paper.render(scene_fields(("zebra", "kite"), 10))
    assert [role for role, _ in turns] == ["user", "assistant", "user"] and "next to" in turns[0][1]
    single = paper.render(scene_fields(("zebra",), 10), single=True)
    assert "next to" not in single[0][1] and "a zebra" in single[2][1] and "10 different phrases" in single[2][1]
    assert objects_phrase(("zebra", "apple", "kite")) == "a zebra, an apple and a kite"
    bad = tmp_path / "bad.yaml"
    bad.write_text("messages:\n  - user: 'Describe a picture.'\n")
    with pytest.raises(MlgenError, match=r"no \{objects\} placeholder"):
        load_instruction("mlgen", str(bad))
    bad.write_text("messages:\n  - user: 'Describe {objects} for {who}.'\n")
    with pytest.raises(MlgenError, match=r"unknown placeholder \{who\}"):
        load_instruction("mlgen", str(bad))
    assert answer_lines('{"phrases": ["1. A kite.", "A zebra."]}', "list") == ["A kite.", "A zebra."]
    assert answer_lines("Caption: A kite over a zebra.\nSecond line", "one") == ["A kite over a zebra."]


def test_validation_names_every_label_and_no_other() -> None:
    validator = PromptValidator(LABELS, {"hair drier": ["hair dryer"]}, Embedder(torch.device("cpu")), 6, 30, 0.9)
    assert (
        validator.reason("A brown teddy bear sits beside a pink hair dryer on a bed.", ("teddy bear", "hair drier"))
        is None
    )
    assert mentions("Two zebras graze", "zebra") and not mentions("zebrafish swim", "zebra")
    teddy = "A brown teddy bear sits on a wooden chair in a sunny room."
    assert validator.reason(teddy, ("teddy bear",)) is None  # 'bear' inside 'teddy bear' is no other label
    assert validator.reason("A kite flies over a grizzly bear in the wild.", ("kite",)) == "other_label"
    assert validator.reason("A kite flies high over the wide sunny beach today.", ("kite", "zebra")) == "missing_label"
    rejected: Counter = Counter()
    kept = validator.select(
        [
            "A zebra stands on the sand next to a yellow surfboard at sunset.",
            "A zebra stands on the sand next to a yellow surfboard at sunset!",  # near duplicate
            "Surfboards lean against a fence while two zebras graze behind them.",
            "A zebra.",
        ],
        ("zebra", "surfboard"),
        [],
        rejected,
    )
    assert len(kept) == 2 and rejected == {"near_duplicate": 1, "too_short": 1}


class CountingBackend:
    """Answers by echoing the seed and counts every question it is asked (the cache's client)."""

    kind, model = "echo", "echo"

    def __init__(self) -> None:
        self.asked = 0

    def complete(self, requests):
        self.asked += len(requests)
        return [f"answer {r.seed}" if r.seed % 5 else None for r in requests]  # every 5th fails


def test_request_cache_asks_each_question_once(tmp_path: Path) -> None:
    backend = CountingBackend()
    requests = [ChatRequest((("user", "hi"),), 0.6, 0.9, 8, seed) for seed in range(10)]
    first = RequestCache(tmp_path).complete(backend, requests)
    second_cache = RequestCache(tmp_path)
    assert second_cache.complete(backend, requests) == first
    assert backend.asked == 10 + 2 and second_cache.hits == 8  # only the two failed ones asked again
    other = ChatRequest((("user", "hi"),), 0.7, 0.9, 8, 1)  # another temperature is another question
    assert RequestCache(tmp_path).key(backend, other) != RequestCache(tmp_path).key(backend, requests[1])
    assert request_seed(0, ("zebra",), 0, 1) == request_seed(0, ("zebra",), 0, 1) != request_seed(0, ("zebra",), 1, 1)


def cache_files(run: Path) -> int:
    return sum(1 for _ in (run / "llm-cache").glob("*/*.json"))


def test_killed_run_resumes_without_asking_answered_questions_again(tmp_path: Path) -> None:
    """kill -9 in the middle of the only shard; the rerun gets the answered requests from the cache.

    Two process starts and about ten short SmolLM2 answers (one attempt per set).
    """
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    (tmp_path / "one-attempt.yaml").write_text("prompts:\n  max_attempts: 1\n")  # no re-asking: fewer answers
    args = ["prompts", "--run", "R", "--classes", "c.txt", "--prompts-per-set", "2", "--synonyms", "1"]
    args += ["--batch-size", "1", "--config", "one-attempt.yaml"]
    env = {**os.environ, "MLGEN_PROMPTS_MAX_NEW_TOKENS": "20"}
    run = tmp_path / "R"
    proc = subprocess.Popen([sys.executable, "-m", "mlgen", *args], cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    synonyms = run / "prompts" / "parts" / "synonyms.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if synonyms.is_file() and cache_files(run) >= json.loads(synonyms.read_text())["requests"] + 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    answered = cache_files(run)
    synonym_requests = json.loads(synonyms.read_text())["requests"]
    result = mlgen(*args, cwd=tmp_path, timeout=600, env={"MLGEN_PROMPTS_MAX_NEW_TOKENS": "20"})
    assert result.returncode == 0, result.stderr
    stats = json.loads((run / "prompts" / "00000_stats.json").read_text())
    assert stats["cache_hits"] == answered - synonym_requests  # none asked twice
    assert cache_files(run) == synonym_requests + stats["requests"]  # every question asked exactly once
    report = json.loads((run / "prompts" / "report.json").read_text())
    assert report["requests"]["answered_from_cache"] == stats["cache_hits"]
    prompts = pq.read_table(run / "prompts" / "prompts.parquet").to_pylist()
    assert {tuple(p["labels"]) for p in prompts} == {("zebra",), ("zebra", "kite"), ("kite",)}
    assert all(p["source"] in ("llm:smollm2", "template") and p["attempt"] >= -1 for p in prompts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(
    importlib.util.find_spec("fastapi") is None, reason="transformers serve needs transformers[serving]"
)
def test_openai_backend_against_a_real_transformers_server(tmp_path: Path) -> None:
    """`transformers serve` with the embedded SmolLM2 folder on loopback; `--llm openai:FOLDER` end to end."""
    from mlgen.models.registry import smollm2_folder

    folder, port = str(smollm2_folder()), free_port()
    serve = Path(sys.executable).with_name("transformers")
    server = subprocess.Popen(
        [str(serve), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        (tmp_path / "c.txt").write_text("zebra\nkite\n")
        args = ["prompts", "--run", "R", "--classes", "c.txt", "--llm", f"openai:{folder}", "--llm-base-url", url]
        args += ["--prompts-per-set", "1", "--synonyms", "1", "--concurrency", "4"]
        (tmp_path / "one-attempt.yaml").write_text("prompts:\n  max_attempts: 1\n")  # 5 requests, none re-asked
        args += ["--config", "one-attempt.yaml"]
        result = mlgen(*args, cwd=tmp_path, timeout=600, env={"MLGEN_PROMPTS_MAX_NEW_TOKENS": "16"})
        assert result.returncode == 0, result.stderr
        report = json.loads((tmp_path / "R" / "prompts" / "report.json").read_text())
        assert report["requests"]["total"] >= 3 and report["answers"]["candidates"] >= 1
        prompts = pq.read_table(tmp_path / "R" / "prompts" / "prompts.parquet").to_pylist()
        assert len({p["set_id"] for p in prompts}) == 3
        assert all(p["model"] == folder for p in prompts if p["source"] != "template")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_server_that_is_down_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    port = free_port()  # nobody listens there
    args = ["prompts", "--run", "R", "--classes", "c.txt", "--llm", "openai:m"]
    result = mlgen(
        *args, "--llm-base-url", f"http://127.0.0.1:{port}/v1", cwd=tmp_path, env={"MLGEN_PROMPTS_REQUEST_RETRIES": "0"}
    )
    assert "cannot reach the LLM server" in error_line(result)


def test_a_server_that_never_answers_times_out_with_one_line(tmp_path: Path) -> None:
    """A real listener on loopback that accepts connections and never replies: the client's timeout ends it."""
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        env = {"MLGEN_PROMPTS_REQUEST_RETRIES": "0", "MLGEN_PROMPTS_REQUEST_TIMEOUT": "1"}
        started = time.monotonic()
        args = ["prompts", "--run", "R", "--classes", "c.txt", "--llm", "openai:m", "--llm-base-url", url]
        result = mlgen(*args, cwd=tmp_path, env=env, timeout=120)
    assert "cannot reach the LLM server" in error_line(result) and "timed out" in error_line(result).lower()
    assert time.monotonic() - started < 100  # ended by the 1 s timeout, not by the test's
    assert not (tmp_path / "R" / "prompts" / "_SUCCESS.json").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed (pip install 'mlgen[vllm]')"
)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU")
@pytest.mark.gpu
def test_vllm_backend_writes_structured_prompts(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    args = ["prompts", "--run", "R", "--classes", "c.txt", "--llm", "vllm:smollm2"]
    result = mlgen(*args, "--prompts-per-set", "2", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "R" / "prompts" / "report.json").read_text())
    assert report["answers"]["candidates"] > 0


BAD = {
    "template-without-placeholder": (["--prompt-template", "t.yaml"], "no {objects} placeholder"),
    "set-size-too-large": (["--set-size", "5"], "larger than the number of labels"),
    "exclude-unknown": (["--exclude-pairs", "x.txt"], "must name two labels of the classes file"),
    "label-sets-unknown": (["--label-sets", "s.txt"], "'cat', which is not in the classes file"),
    "style-unknown": (["--prompt-style", "poem"], "prompt_style"),
    "exclude-missing": (["--exclude-pairs", "nope.txt"], "not found"),
    "synonym-source-unknown": (["--synonym-source", "thesaurus"], "synonym_source"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_prompt_input_fails_with_one_line(tmp_path: Path, case: str) -> None:
    (tmp_path / "c.txt").write_text("zebra\nkite\n")
    (tmp_path / "t.yaml").write_text("messages:\n  - user: Describe a picture.\n")
    (tmp_path / "x.txt").write_text("zebra, dog\n")
    (tmp_path / "s.txt").write_text("zebra, kite\ncat\n")
    flags, message = BAD[case]
    result = mlgen("prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", *flags, cwd=tmp_path)
    assert message in error_line(result)
    assert not (tmp_path / "R" / "prompts").exists()


def test_label_set_options_on_the_template_backend(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("zebra\nkite\nsurfboard\nbear\n")
    (tmp_path / "x.txt").write_text("# confusable\nzebra, kite\n")
    args = ["prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", "--exclude-pairs", "x.txt"]
    result = mlgen(*args, "--set-size", "3", "--sets-per-label", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "template only" in result.stdout
    sets = pq.read_table(tmp_path / "R" / "prompts" / "label_sets.parquet").to_pylist()
    assert {s["method"] for s in sets} == {"balanced"} and not any({"zebra", "kite"} <= set(s["labels"]) for s in sets)
    report = json.loads((tmp_path / "R" / "prompts" / "report.json").read_text())
    assert report["share_from_template"] == 1.0 and report["prompts"]["label_coverage"] == 1.0


class ScriptedBackend:
    """Bad LLM output on demand: empty, malformed, failed and one good answer per round (nothing real does this)."""

    kind, model = "scripted", "scripted"
    chunk_size = 64

    def complete(self, requests):
        script = ["", "{not json", None, "   ", "A zebra runs across the green grass next to a red kite in the wind."]
        return [script[r.seed % len(script)] if r.messages[-1][1].startswith("Objects") else "" for r in requests]


def test_bad_llm_output_is_counted_and_the_template_fills_in(tmp_path: Path, monkeypatch) -> None:
    from mlgen.config import PromptsConfig
    from mlgen.pipeline.rundir import RunDir
    from mlgen.pipeline.runner import run_stage
    from mlgen.prompts import stage as prompt_stage

    monkeypatch.setattr(prompt_stage, "make_backend", lambda *args: ScriptedBackend())
    config = PromptsConfig(llm="scripted", prompts_per_set=2, synonyms_per_label=2)
    run_stage(prompt_stage.PromptStage(RunDir(tmp_path / "R"), config, ["zebra", "kite"]))
    report = json.loads((tmp_path / "R" / "prompts" / "report.json").read_text())
    rejected = report["answers"]["rejected"]
    assert rejected.get("empty", 0) > 0 and rejected.get("request_failed", 0) > 0
    assert report["template_filled_sets"] >= 1 and 0 < report["share_from_template"] < 1
    prompts = pq.read_table(tmp_path / "R" / "prompts" / "prompts.parquet").to_pylist()
    assert {p["source"] for p in prompts} == {"llm:scripted", "template"}
    assert all(p["attempt"] == -1 for p in prompts if p["source"] == "template")
