"""Prompt-stage throughput, as ratios measured in one run (no request cache: every answer is generated).

1. the embedded SmolLM2 through the transformers backend: a batch of B requests vs one request at a time,
   and the batch with its shared instruction prefix encoded once vs encoded for every request;
2. ``openai:`` against a local ``transformers serve`` (the same model): C requests in flight vs one.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/prompts.py [--requests 16] [--batch 16] [--concurrency 8]

Goals (issue 5): batched >= 5x one at a time; concurrency 8 >= 4x concurrency 1.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mlgen.models.registry import smollm2_folder
from mlgen.prompts.backends import ChatRequest, OpenAIBackend, TransformersBackend, request_seed
from mlgen.prompts.instructions import load_instruction, scene_fields

LABEL_SETS = [("zebra", "kite"), ("surfboard",), ("hair drier", "teddy bear"), ("dog", "umbrella")]


def requests(count: int, max_tokens: int) -> list[ChatRequest]:
    instruction = load_instruction("mlgen")
    sets = [LABEL_SETS[i % len(LABEL_SETS)] for i in range(count)]
    return [
        ChatRequest(instruction.render(scene_fields(s, 1)), 0.6, 0.9, max_tokens, request_seed("bench", s, i))
        for i, s in enumerate(sets)
    ]


def rate(backend, batch: list[ChatRequest]) -> float:
    started = time.perf_counter()
    answers = backend.complete(batch)
    assert all(a is not None for a in answers)
    return len(batch) / (time.perf_counter() - started)


def serve(folder: str, continuous: bool) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu", folder]
    command += ["--continuous-batching"] if continuous else []
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server, f"http://127.0.0.1:{port}/v1"
        time.sleep(0.5)
    server.terminate()
    raise SystemExit("transformers serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--continuous-batching", action="store_true", help="start transformers serve with it")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = requests(args.requests, args.max_tokens)

    backend = TransformersBackend("smollm2", torch.device("cpu"), batch_size=args.batch)
    # Every arm is the same backend.complete() call; only the batch size and prefix reuse differ (a batch of
    # one has no shared prefix: no separate prefix pass). Each arm is warmed up the same way, the arms
    # alternate, and each figure is the median of three.
    arms = {"batched": (args.batch, True), "unshared": (args.batch, False), "single": (1, True)}
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    for batch_size, reuse in arms.values():
        backend.batch_size, backend.reuse_prefix = batch_size, reuse
        backend.complete(work[:2])  # the same warm-up for every arm
    for _ in range(3):
        for arm, (batch_size, reuse) in arms.items():
            backend.batch_size, backend.reuse_prefix = batch_size, reuse
            rates[arm].append(rate(backend, work))
    batched, unshared, single = (statistics.median(rates[arm]) for arm in arms)
    print(f"embedded smollm2: batch {args.batch} {batched:.2f} prompts/s, one at a time {single:.2f} prompts/s, "
          f"ratio {batched / single:.2f}x (goal 5x)  [median of 3, alternated]")  # fmt: skip
    print(f"  batch {args.batch} with the shared instruction encoded once vs per request: {batched / unshared:.2f}x")
    del backend

    folder = str(smollm2_folder())
    server, url = serve(folder, args.continuous_batching)
    try:
        client = OpenAIBackend(folder, url, concurrency=1, timeout=600, retries=0)
        client.check()
        client.complete(work[:2])  # warm-up: the server loads the model on first use
        served: dict[int, list[float]] = {1: [], args.concurrency: []}
        for _ in range(3):  # alternated, median of 3
            for concurrency in served:
                client.concurrency = concurrency
                served[concurrency].append(rate(client, work))
        one, many = statistics.median(served[1]), statistics.median(served[args.concurrency])
        print(f"openai: (transformers serve{' --continuous-batching' if args.continuous_batching else ''}): "
              f"concurrency {args.concurrency} {many:.2f} prompts/s, concurrency 1 {one:.2f} prompts/s, "
              f"ratio {many / one:.2f}x (goal 4x)")  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"README: batch {args.batch} {batched / single:.2f}x one request at a time, the shared prefix alone "
          f"{batched / unshared:.2f}x, openai: concurrency {args.concurrency} {many / one:.2f}x concurrency 1 "
          f"({args.requests} requests, {args.max_tokens} new tokens, median of 3)")  # fmt: skip


if __name__ == "__main__":
    main()
