"""Prompt writers: the paper's template, a transformers chat LLM (SmolLM2 built in), or vLLM.

The LLM plays the paper's painter: for a label set it describes one picture showing every label.
Small models wander, so every answer is validated (mentions each label, long enough, not a
duplicate) and sets left short are topped up with the template sentence.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Protocol

import torch

from mlgen.config import PromptsConfig
from mlgen.errors import MlgenError
from mlgen.models.registry import causal_lm_folder
from mlgen.prompts.composer import template_prompt

TEMPLATE = "template"

PAINTER_SYSTEM = "You are a painter. You describe pictures in vivid, concrete detail."
SCENE_REQUEST = (
    "Describe one picture that contains {labels}, next to each other. "
    "Write one sentence of at least 10 words that names {names}."
)
SYNONYM_REQUEST = "Give {n} other words or short phrases that mean '{label}'. Answer with a comma-separated list only."


@dataclass
class Prompt:
    text: str
    source: str  # "llm:NAME" or "template"


class PromptWriter(Protocol):
    name: str

    def scene_prompts(self, label_sets: list[tuple[str, ...]], n: int, seed: int) -> list[list[Prompt]]: ...

    def synonyms(self, labels: list[str], n: int, seed: int, all_labels: list[str]) -> list[list[str]]: ...


def mentions(text: str, label: str) -> bool:
    """Whether ``text`` names ``label`` (whole words, plural allowed)."""
    return re.search(rf"\b{re.escape(label)}(e?s)?\b", text, flags=re.IGNORECASE) is not None


def clean_sentence(text: str) -> str:
    """First line of an answer without list numbering, bullets or quotes."""
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    line = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", line).strip().strip("\"“”'").strip()
    return line


def valid_scene(text: str, label_set: tuple[str, ...]) -> bool:
    words = len(text.split())
    return 8 <= words <= 77 and all(mentions(text, label) for label in label_set)


def pick_prompts(candidates: list[str], label_set: tuple[str, ...], n: int, source: str) -> list[Prompt]:
    """Up to ``n`` valid, distinct answers; the template fills what is missing (once)."""
    chosen: list[Prompt] = []
    seen: set[str] = set()
    for raw in candidates:
        text = clean_sentence(raw)
        if valid_scene(text, label_set) and text.lower() not in seen:
            seen.add(text.lower())
            chosen.append(Prompt(text, source))
        if len(chosen) == n:
            return chosen
    fallback = template_prompt(label_set)
    if fallback.lower() not in seen:
        chosen.append(Prompt(fallback, TEMPLATE))
    return chosen


def parse_synonyms(answer: str, label: str, n: int, other_labels: tuple[str, ...] = ()) -> list[str]:
    """Distinct short synonyms from a comma-separated answer; other classes' names are refused."""
    synonyms: list[str] = []
    for item in re.split(r"[,\n;]", answer):
        word = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", item.lower())
        word = re.sub(r"^(a|an|the)\s+", "", re.sub(r"[^a-z0-9' -]", "", word).strip())
        too_close = word == label or any(mentions(word, other) for other in other_labels)
        if word and not too_close and len(word.split()) <= 4 and word not in synonyms:
            synonyms.append(word)
    return synonyms[:n]


class TemplateWriter:
    """No LLM: the paper's fallback sentence, one per set; no synonyms beyond the label."""

    name = TEMPLATE

    def scene_prompts(self, label_sets: list[tuple[str, ...]], n: int, seed: int) -> list[list[Prompt]]:
        return [[Prompt(template_prompt(s), TEMPLATE)] for s in label_sets]

    def synonyms(self, labels: list[str], n: int, seed: int, all_labels: list[str]) -> list[list[str]]:
        return [[] for _ in labels]


class TransformersWriter:
    """A chat LLM run with transformers, batched over label sets."""

    def __init__(self, name: str, config: PromptsConfig, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = causal_lm_folder(name)
        self.name = name
        self.config = config
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    def _chat(self, requests: list[str], samples: int, seed: int) -> list[list[str]]:
        """``samples`` sampled answers for each request."""
        answers: list[list[str]] = []
        for start in range(0, len(requests), self.config.batch_size):
            batch = requests[start : start + self.config.batch_size]
            messages = [[{"role": "system", "content": PAINTER_SYSTEM}, {"role": "user", "content": r}] for r in batch]
            inputs = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
            ).to(self.device)
            torch.manual_seed(seed + start)
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    do_sample=self.config.temperature > 0,
                    temperature=self.config.temperature or None,
                    top_p=self.config.top_p,
                    max_new_tokens=self.config.max_new_tokens,
                    num_return_sequences=samples,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            texts = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            answers.extend(texts[i * samples : (i + 1) * samples] for i in range(len(batch)))
        return answers

    def scene_prompts(self, label_sets: list[tuple[str, ...]], n: int, seed: int) -> list[list[Prompt]]:
        requests = [scene_request(s) for s in label_sets]
        answers = self._chat(requests, samples=2 * n, seed=seed)  # oversample: some answers are invalid
        return [pick_prompts(a, s, n, f"llm:{self.name}") for a, s in zip(answers, label_sets, strict=True)]

    def synonyms(self, labels: list[str], n: int, seed: int, all_labels: list[str]) -> list[list[str]]:
        """Up to ``n`` synonyms per label (S^3's synonym spaces start from these)."""
        requests = [SYNONYM_REQUEST.format(n=n, label=label) for label in labels]
        answers = self._chat(requests, samples=2, seed=seed)
        return [
            parse_synonyms(", ".join(a), label, n, tuple(x for x in all_labels if x != label))
            for a, label in zip(answers, labels, strict=True)
        ]


def scene_request(label_set: tuple[str, ...]) -> str:
    if len(label_set) == 1:
        return SCENE_REQUEST.format(labels=f"a {label_set[0]}", names=f"the {label_set[0]}").replace(
            ", next to each other", ""
        )
    return SCENE_REQUEST.format(
        labels=" and ".join(f"a {label}" for label in label_set),
        names=" and the ".join(f"the {label}" for label in label_set).replace("the the ", "the "),
    )


class VllmWriter(TransformersWriter):
    """The same requests through vLLM (``pip install 'mlgen[vllm]'``, GPU machines)."""

    def __init__(self, name: str, config: PromptsConfig, device: torch.device) -> None:
        from vllm import LLM

        self.name = name
        self.config = config
        self.llm = LLM(model=causal_lm_folder(name))

    def _chat(self, requests: list[str], samples: int, seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=samples,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            max_tokens=self.config.max_new_tokens,
            seed=seed,
        )
        messages = [[{"role": "system", "content": PAINTER_SYSTEM}, {"role": "user", "content": r}] for r in requests]
        outputs = self.llm.chat(messages, params, use_tqdm=False)
        return [[choice.text for choice in out.outputs] for out in outputs]


def check_llm(name: str) -> None:
    """Fail at once on an LLM that cannot be loaded (missing vLLM, unknown id)."""
    if name == TEMPLATE:
        return
    if name.startswith("vllm:"):
        if importlib.util.find_spec("vllm") is None:
            raise MlgenError("--llm vllm:... needs vLLM: pip install 'mlgen[vllm]'")
        name = name.removeprefix("vllm:")
    causal_lm_folder(name)


def make_writer(config: PromptsConfig, device: torch.device) -> PromptWriter:
    if config.llm == TEMPLATE:
        return TemplateWriter()
    if config.llm.startswith("vllm:"):
        return VllmWriter(config.llm.removeprefix("vllm:"), config, device)
    return TransformersWriter(config.llm, config, device)
