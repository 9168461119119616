"""The bookkeeping of ``bench/device_check.sh``: device_check.json, each step's checks, and two steps' bodies.

Subcommands (the shell script calls them; each is one process, so a crash in one step spares the others):

- ``init OUT MODE BUDGET``: a fresh ``OUT/device_check.json`` (no steps yet);
- ``env OUT``: the machine's figures (GPU, driver, torch/CUDA, library versions) as the step ``env``;
- ``pytest OUT NAME -- ARGS``: pytest with a JUnit report; its counts become the step's figures, and a run
  in which every test skipped is a skip whose reason is pytest's own;
- ``random-lm FOLDER``: a small causal LM with random weights and a tokenizer trained here (no download);
- ``record OUT NAME --rc RC --started T --limit S``: the step's status from its exit status, its figures
  (``OUT/figures/NAME.json``) and the checks below; rewrites device_check.json at once, so a check killed
  half-way still leaves every finished step on disk;
- ``skip OUT NAME REASON`` and ``finish OUT`` (the summary; exit status 1 when a step failed).
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

Check = tuple[str, Callable[[dict[str, Any]], bool]]
SDPA = ["AttnProcessor2_0"]


def _gen(f: dict[str, Any]) -> dict[str, Any]:
    return f["generate"]


def _ratios_near_one(f: dict[str, Any]) -> bool:
    return f["generate"]["ratio"] >= 0.95 and f["filter"]["ratio"] >= 0.95


def _finite_losses(f: dict[str, Any]) -> bool:
    return bool(f["finetune"]["losses"]) and all(math.isfinite(x) for x in f["finetune"]["losses"])


# What each step's figures must show, per mode (a false check fails the step, named in its reason).
CHECKS: dict[str, dict[str, list[Check]]] = {
    "generate": {
        "cuda": [
            ("fp16 weights", lambda f: _gen(f)["dtype"] == "float16"),
            ("SDPA attention everywhere", lambda f: _gen(f)["attention"] == SDPA),
            ("automatic batch size above 1", lambda f: _gen(f)["batch_size"] > 1),
            ("VAE slicing at 768 px", lambda f: _gen(f)["vae_slicing"]),
            ("no VAE tiling at 768 px", lambda f: not _gen(f)["vae_tiling"]),
            ("stage/bare ratios >= 0.95", _ratios_near_one),
            ("peak GPU memory recorded", lambda f: (f["memory"]["peak_gpu_gib"] or 0) > 0),
        ],
        "cpu": [
            ("fp32 weights", lambda f: _gen(f)["dtype"] == "float32"),
            ("no VAE slicing or tiling on CPU", lambda f: not (_gen(f)["vae_slicing"] or _gen(f)["vae_tiling"])),
            ("positive rates", lambda f: _gen(f)["images_per_s"] > 0 and f["filter"]["images_per_s"] > 0),
        ],
    },
    "finetune": {
        "cuda": [
            ("mixed precision (bf16 or fp16 autocast)", lambda f: f["finetune"]["autocast"] in ("bfloat16", "float16")),
            ("gradient checkpointing", lambda f: f["finetune"]["gradient_checkpointing"]),
            ("finite losses", _finite_losses),
        ],
        "cpu": [
            ("no autocast on CPU", lambda f: f["finetune"]["autocast"] is None),
            ("gradient checkpointing", lambda f: f["finetune"]["gradient_checkpointing"]),
            ("finite losses", _finite_losses),
        ],
    },
    "tiling": {
        "cuda": [
            ("VAE tiling above 1024 px", lambda f: _gen(f)["vae_tiling"]),
            ("VAE slicing (batch 2)", lambda f: _gen(f)["vae_slicing"]),
        ],
    },
    "compile": {
        "cuda": [
            ("compiled UNet", lambda f: _gen(f)["compiled"]),
            ("stage/bare ratios >= 0.95", _ratios_near_one),
        ],
    },
    "sdxl": {
        "cuda": [
            ("fp16 weights", lambda f: _gen(f)["dtype"] == "float16"),
            ("SDPA attention everywhere", lambda f: _gen(f)["attention"] == SDPA),
        ],
    },
    "random_lm": {mode: [("weights written", lambda f: f["parameters"] > 0)] for mode in ("cuda", "cpu")},
    "prompts_transformers": {
        mode: [("every label set has its prompts", lambda f: f["counts"].get("prompts", 0) > 0)]
        for mode in ("cuda", "cpu")
    },
    "prompts_vllm": {
        "cuda": [("every label set has its prompts", lambda f: f["counts"].get("prompts", 0) > 0)],
    },
}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def report_path(out: Path) -> Path:
    return out / "device_check.json"


def load(out: Path) -> dict[str, Any]:
    return json.loads(report_path(out).read_text(encoding="utf-8"))


def save(out: Path, report: dict[str, Any]) -> None:
    counts = {s: sum(step["status"] == s for step in report["steps"]) for s in ("ok", "skip", "failed")}
    report["summary"] = counts
    tmp = report_path(out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    tmp.replace(report_path(out))


def add_step(out: Path, step: dict[str, Any]) -> None:
    report = load(out)
    report["steps"] = [s for s in report["steps"] if s["name"] != step["name"]] + [step]
    save(out, report)


def log_tail(out: Path, name: str, lines: int = 25) -> str:
    path = out / "logs" / f"{name}.log"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def cmd_init(out: Path, mode: str, budget: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save(out, {"mode": mode, "started": now(), "finished": None, "budget_s": int(budget), "steps": []})


def cmd_record(out: Path, name: str, rc: int, started: float, limit: int) -> None:
    mode = load(out)["mode"]
    step: dict[str, Any] = {"name": name, "seconds": round(time.time() - started, 1), "log": f"logs/{name}.log"}
    figures_path, skip_path = out / "figures" / f"{name}.json", out / "figures" / f"{name}.skip"
    figures = json.loads(figures_path.read_text(encoding="utf-8")) if figures_path.is_file() else None
    if figures is not None:
        step["figures"] = figures
    if skip_path.is_file() and rc == 0:
        step.update(status="skip", reason=skip_path.read_text(encoding="utf-8").strip())
    elif rc in (124, 137):
        step.update(status="failed", reason=f"timed out after {limit} s", error=log_tail(out, name))
    elif rc != 0:
        last = next((line for line in reversed(log_tail(out, name).splitlines()) if line.strip()), "")
        step.update(status="failed", reason=f"exit status {rc}: {last[:300]}", error=log_tail(out, name))
    else:
        checks = CHECKS.get(name, {}).get(mode, [])
        results: dict[str, bool] = {}
        for what, check in checks:
            try:
                results[what] = bool(check(figures or {}))
            except (KeyError, TypeError, IndexError):
                results[what] = False
        step["checks"] = results
        wrong = [what for what, passed in results.items() if not passed]
        step["status"] = "failed" if wrong else "ok"
        if wrong:
            step["reason"] = "check failed: " + "; ".join(wrong)
    add_step(out, step)
    print(f"device check: {name}: {step['status']} ({step['seconds']} s){': ' + step.get('reason', '')}")


def cmd_skip(out: Path, name: str, reason: str) -> None:
    add_step(out, {"name": name, "status": "skip", "seconds": 0.0, "reason": reason})
    print(f"device check: {name}: skip: {reason}")


def cmd_finish(out: Path) -> int:
    report = load(out)
    report["finished"] = now()
    save(out, report)
    s = report["summary"]
    print(f"device check ({report['mode']}): {s['ok']} ok, {s['skip']} skipped, {s['failed']} failed -> {out}")
    return 1 if s["failed"] else 0


def cmd_env(out: Path) -> None:
    import diffusers
    import torch
    import transformers

    import mlgen

    cuda = torch.cuda.is_available()
    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "mlgen": mlgen.__version__,
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "bf16": torch.cuda.is_bf16_supported() if cuda else None,
    }
    try:
        import vllm

        figures["vllm"] = vllm.__version__
    except ImportError:
        figures["vllm"] = None
    if cuda:
        query = ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
        try:
            figures["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            figures["nvidia_smi"] = f"unavailable: {err}"
    write_figures(out, "env", figures)


def write_figures(out: Path, name: str, figures: dict[str, Any]) -> None:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "figures" / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")


def cmd_pytest(out: Path, name: str, args: list[str]) -> int:
    junit = out / "figures" / f"{name}.junit.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    rc = subprocess.run(
        [sys.executable, "-m", "pytest", f"--junitxml={junit}", "-p", "no:cacheprovider", *args]
    ).returncode
    if rc == 5:  # no test collected: nothing carries the marker
        (out / "figures" / f"{name}.skip").write_text(f"no test selected by pytest {' '.join(args)}\n")
        return 0
    if not junit.is_file():
        return rc
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    write_figures(
        out, name, {**counts, "seconds": float(suite.get("time", 0)), "skip_reasons": reasons, "failed": failed}
    )
    if rc == 0 and counts["tests"] and counts["skipped"] == counts["tests"]:
        (out / "figures" / f"{name}.skip").write_text(f"every test skipped: {'; '.join(reasons)}\n")
    return rc


def cmd_random_lm(folder: Path, figures_out: Path, name: str) -> None:
    """A 4-layer Llama with random weights and a byte-level BPE tokenizer trained on English words here,
    with a chat template: what ``--llm FOLDER`` and ``--llm vllm:FOLDER`` need, built with no download."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from wordfreq import top_n_list

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    words = top_n_list("en", 5000)
    tokenizer.train_from_iterator([" ".join(words[i : i + 20]) for i in range(0, len(words), 20)], trainer)
    chat = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = chat
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=fast.vocab_size if len(fast) <= fast.vocab_size else len(fast),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,  # head size 64: every vLLM attention backend takes it
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    write_figures(figures_out, name, {"folder": str(folder), "parameters": parameters, "vocab": len(fast)})


def cmd_prompts_figures(out: Path, name: str, run: Path) -> None:
    """The prompt stage's _SUCCESS.json counts as the step's figures."""
    marker = json.loads((run / "prompts" / "_SUCCESS.json").read_text(encoding="utf-8"))
    write_figures(out, name, {"counts": marker.get("counts", {}), "seconds": marker.get("seconds")})


def main(argv: list[str]) -> int:
    command, out = argv[0], Path(argv[1])
    if command == "init":
        cmd_init(out, argv[2], argv[3])
    elif command == "env":
        cmd_env(out)
    elif command == "record":
        opts = dict(zip(argv[3::2], argv[4::2], strict=True))
        cmd_record(out, argv[2], int(opts["--rc"]), float(opts["--started"]), int(opts["--limit"]))
    elif command == "skip":
        cmd_skip(out, argv[2], argv[3])
    elif command == "finish":
        return cmd_finish(out)
    elif command == "pytest":
        return cmd_pytest(out, argv[2], argv[argv.index("--") + 1 :])
    elif command == "random-lm":
        cmd_random_lm(out, Path(argv[2]), argv[3])
    elif command == "prompts-figures":
        cmd_prompts_figures(out, argv[2], Path(argv[3]))
    else:
        print(f"device_check.py: unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
