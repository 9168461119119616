"""Synonyms per label from the embedded SmolLM2 under decoding options mlgen does not use, and what they are.

The prompt stage asks each label's synonyms 4 times (2 rounds of 2 seeds) and validates the pooled answers.
This asks the same 4 requests (same instruction, seeds and sampling) with extra ``generate`` options and
prints the validated synonyms, so the count can be read next to what was counted:

    HF_HUB_OFFLINE=1 python bench/synonyms.py [--modes plain,norepeat3,ban,ban+norepeat3,reppen1.3]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import Counter

import torch

from mlgen.config import PromptsConfig
from mlgen.prompts.backends import ChatRequest, TransformersBackend, request_seed
from mlgen.prompts.instructions import load_instruction
from mlgen.prompts.validate import Embedder, validate_synonyms

LABELS = ["zebra", "surfboard", "hair drier", "teddy bear", "kite"]  # issue 17's five COCO labels
SAMPLES = 4  # SYNONYM_ROUNDS * SYNONYM_SAMPLES in the prompt stage


def label_token_sequences(tokenizer, labels: list[str]) -> list[list[int]]:
    """Token ids of every label as written, capitalised and plural, with and without a leading space."""
    written = [form for label in labels for form in (label, label.title(), label + "s")]
    forms = {space + form for form in written for space in ("", " ")}
    return [tokenizer.encode(form, add_special_tokens=False) for form in sorted(forms)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="plain,norepeat3,ban,ban+norepeat3,reppen1.3")
    modes = parser.parse_args().modes.split(",")
    config = PromptsConfig()
    backend = TransformersBackend("smollm2", torch.device("cpu"), batch_size=8)
    embedder = Embedder(torch.device("cpu"))
    instruction = load_instruction("synonyms", allowed=("label", "n"), required="label")
    banned = label_token_sequences(backend.tokenizer, LABELS)
    options = {
        "plain": {},
        "norepeat3": {"no_repeat_ngram_size": 3},
        "ban": {"bad_words_ids": banned},
        "ban+norepeat3": {"no_repeat_ngram_size": 3, "bad_words_ids": banned},
        "reppen1.3": {"repetition_penalty": 1.3},
    }
    generate = backend.lm.generate
    n = config.synonyms_per_label
    requests = [
        ChatRequest(
            instruction.render({"label": label, "n": str(n)}),
            config.temperature,
            config.top_p,
            config.max_new_tokens,
            request_seed(config.seed, "synonyms", label, sample),
        )
        for label in LABELS
        for sample in range(SAMPLES)
    ]
    for mode in modes:
        backend.lm.generate = functools.partial(generate, **options[mode])
        started = time.perf_counter()
        answers = backend.complete(requests)
        raw = {label: answers[i * SAMPLES : (i + 1) * SAMPLES] for i, label in enumerate(LABELS)}
        rejected: Counter = Counter()
        synonyms = validate_synonyms(raw, n, embedder, config.synonym_threshold, rejected)
        mean = sum(len(found) for found in synonyms.values()) / len(LABELS)
        print(f"{mode}: {mean:.1f} valid a label ({time.perf_counter() - started:.0f} s)")
        for label, found in synonyms.items():
            print(f"  {label}: {', '.join(found) or '-'}")
        print(f"  refused: {dict(rejected.most_common())}")


if __name__ == "__main__":
    main()
