"""LLM backends behind one interface: a list of chat requests in, one answer (or None) per request out.

``--llm`` picks the backend: ``template`` (no LLM), ``smollm2`` or any transformers chat model
(in-process, batched), ``vllm:ID`` (offline batched vLLM) and ``openai:MODEL`` (any
OpenAI-compatible server). Every answer goes through :class:`RequestCache` first, keyed by the
full request, so a killed or repeated run never asks the same question twice.

A request carries its own sampling seed (derived from its label set and attempt by the stage), so
an answer never depends on which batch the request landed in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mlgen.errors import MlgenError
from mlgen.models.quiet import quiet_libraries
from mlgen.paths import write_json_atomic

quiet_libraries()  # no weight-loading bars or info logs in mlgen's output

TEMPLATE = "template"


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    json_schema: dict[str, Any] | None = field(default=None, compare=False)  # structured output where supported

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def request_seed(*parts: Any) -> int:
    """A 31-bit seed from the parts (run seed, label set, attempt, sample): never from batch positions."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


class Backend(Protocol):
    kind: str  # transformers, vllm or openai
    model: str

    def complete(self, requests: Sequence[ChatRequest]) -> list[str | None]: ...


class RequestCache:
    """Answers on disk, one JSON file per request, named by the SHA-256 of the whole request."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hits = 0
        self.misses = 0

    def key(self, backend: Backend, request: ChatRequest) -> str:
        data = {"backend": backend.kind, "model": backend.model, **asdict(request)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def complete(self, backend: Backend, requests: Sequence[ChatRequest]) -> list[str | None]:
        """Cached answers; the rest asked in one call and stored as soon as they arrive."""
        keys = [self.key(backend, r) for r in requests]
        answers: list[str | None] = []
        for key in keys:
            path = self._path(key)
            answers.append(json.loads(path.read_text(encoding="utf-8"))["answer"] if path.is_file() else None)
        missing = [i for i, key in enumerate(keys) if not self._path(key).is_file()]
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        step = getattr(backend, "chunk_size", 16)  # stored chunk by chunk: a kill loses one chunk at most
        for first in range(0, len(missing), step):
            chunk = missing[first : first + step]
            for i, answer in zip(chunk, backend.complete([requests[i] for i in chunk]), strict=True):
                answers[i] = answer
                if answer is not None:  # a failed request is asked again next time
                    write_json_atomic(self._path(keys[i]), {"answer": answer, "model": backend.model})
        return answers


class RowSampler:
    """Top-p sampling with one torch.Generator per batch row: a row's tokens depend on its seed only.

    ``generate`` runs greedily over the logits this processor returns (only the drawn token is
    left finite), so batching changes nothing but float rounding.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, candidates: int = 256) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.candidates = candidates

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)
        # The nucleus almost always lies within the most likely few hundred tokens: top-k is much
        # cheaper than sorting the whole vocabulary (a quarter of a batched step was that sort).
        top_probs, top_ids = probs.topk(min(self.candidates, probs.shape[-1]), dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for row, generator in enumerate(self.generators):
            row_probs, row_ids = top_probs[row], top_ids[row]
            if row_probs.sum() <= self.top_p:  # a flat distribution: the nucleus reaches past the candidates
                row_probs, row_ids = probs[row].sort(descending=True)
            row_probs = row_probs.clone()
            row_probs[row_probs.cumsum(0) - row_probs > self.top_p] = 0  # the smallest set reaching top_p
            pick = torch.multinomial(row_probs, 1, generator=generator)
            out[row, row_ids[pick].to(out.device)] = 0
        return out


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens every list starts with, leaving each at least one token of its own; none for a single list (a
    separate prefix pass would only add work)."""
    if len(token_lists) < 2:
        return 0
    limit = max(min(len(tokens) for tokens in token_lists) - 1, 0)
    first = token_lists[0]
    for position in range(limit):
        if any(tokens[position] != first[position] for tokens in token_lists):
            return position
    return limit


class TransformersBackend:
    """A transformers chat model in this process (SmolLM2 built in), batched over requests."""

    kind = "transformers"

    def __init__(self, model: str, device: torch.device, batch_size: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mlgen.models.registry import causal_lm_folder

        folder = causal_lm_folder(model)
        self.model = model
        self.device = device
        self.batch_size = self.chunk_size = batch_size
        self.reuse_prefix = True  # encode the instruction the batch shares once (off: the benchmark's baseline)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; older releases know only the first.
        forward_arguments = inspect.signature(self.lm.forward).parameters
        self.cache_argument = "cache" if "cache" in forward_arguments else "past_key_values"

    def complete(self, requests: Sequence[ChatRequest]) -> list[str | None]:
        answers: list[str | None] = []
        for start in range(0, len(requests), self.batch_size):
            answers += self._complete_batch(list(requests[start : start + self.batch_size]))
        return answers

    def _complete_batch(self, batch: list[ChatRequest]) -> list[str]:
        """One ``generate`` call; the instruction all requests share is encoded once for the batch.

        Rows are laid out as [shared prefix | padding | own tokens] with the padding masked out;
        ``generate`` derives positions from the mask, so each row sees exactly its own prompt.
        """
        from transformers import LogitsProcessorList

        token_lists = [self._tokens(request) for request in batch]
        shared = shared_prefix_length(token_lists) if self.reuse_prefix else 0
        width = max(len(tokens) for tokens in token_lists) - shared
        rows, mask = [], []
        for tokens in token_lists:
            padding = width - (len(tokens) - shared)
            rows.append(tokens[:shared] + [self.tokenizer.pad_token_id] * padding + tokens[shared:])
            mask.append([1] * shared + [0] * padding + [1] * (len(tokens) - shared))
        kwargs = {"input_ids": torch.tensor(rows, device=self.device)}
        kwargs["attention_mask"] = torch.tensor(mask, device=self.device)
        if shared:
            kwargs[self.cache_argument] = self._prefix_cache(token_lists[0][:shared], len(batch))
        first = batch[0]
        processors = LogitsProcessorList()
        if first.temperature > 0:
            processors.append(RowSampler([r.seed for r in batch], first.temperature, first.top_p))
        with torch.inference_mode():
            output = self.lm.generate(
                **kwargs,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=processors,
                max_new_tokens=max(r.max_tokens for r in batch),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return self.tokenizer.batch_decode(output[:, len(rows[0]) :], skip_special_tokens=True)

    def _tokens(self, request: ChatRequest) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(request.chat(), add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def _prefix_cache(self, prefix: list[int], rows: int) -> Any:
        """The key/value cache of ``prefix``, computed once and repeated for every row."""
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode():
            prefix_ids = torch.tensor([prefix], device=self.device)
            self.lm(input_ids=prefix_ids, use_cache=True, **{self.cache_argument: cache})
        cache.batch_repeat_interleave(rows)
        return cache


class VllmBackend:
    """Offline batched generation with vLLM (``pip install 'mlgen[vllm]'``, GPU machines)."""

    kind = "vllm"

    def __init__(self, model: str) -> None:
        from vllm import LLM

        from mlgen.models.registry import causal_lm_folder

        self.model = model
        self.chunk_size = 1024  # vLLM schedules a chunk itself
        self.llm = LLM(model=causal_lm_folder(model), seed=0)

    def complete(self, requests: Sequence[ChatRequest]) -> list[str | None]:
        params = [self._params(r) for r in requests]
        outputs = self.llm.chat([r.chat() for r in requests], params, use_tqdm=False)
        return [out.outputs[0].text if out.outputs else None for out in outputs]

    @staticmethod
    def _params(request: ChatRequest) -> Any:
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if request.json_schema is not None:
            try:  # vLLM >= 0.10.2
                from vllm.sampling_params import StructuredOutputsParams

                extra["structured_outputs"] = StructuredOutputsParams(json=request.json_schema)
            except ImportError:  # older releases
                from vllm.sampling_params import GuidedDecodingParams

                extra["guided_decoding"] = GuidedDecodingParams(json=request.json_schema)
        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request.seed,
            **extra,
        )


class OpenAIBackend:
    """Any OpenAI-compatible server: ``vllm serve``, ``transformers serve``, llama.cpp, hosted APIs.

    The official ``openai`` client does the HTTP, its timeouts and its bounded retries with
    exponential backoff; requests run ``concurrency`` at a time. A request that still fails is
    answered None (counted by the stage as ``request_failed``), except a server that cannot be
    reached at all, which stops the stage with one line (cached answers and finished shards stay).
    """

    kind = "openai"

    def __init__(self, model: str, base_url: str | None, concurrency: int, timeout: float, retries: int) -> None:
        import openai

        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.concurrency = concurrency
        self.chunk_size = 4 * concurrency
        self.errors = openai
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=os.environ.get("OPENAI_API_KEY") or "none",  # local servers take any key
            timeout=timeout,
            max_retries=retries,
        )
        self.failures: dict[str, int] = {}

    def check(self) -> None:
        """Fail at once, with one line, when the server is down or does not answer."""
        try:
            self.client.models.list()
        except (self.errors.APIConnectionError, self.errors.APITimeoutError) as err:
            raise MlgenError(f"cannot reach the LLM server at {self.base_url}: {err}") from None
        except self.errors.APIStatusError as err:
            if err.status_code in (401, 403):
                raise MlgenError(f"the LLM server at {self.base_url} refused the key (OPENAI_API_KEY)") from None

    def _one(self, request: ChatRequest) -> str | None:
        try:
            response = self.client.chat.completions.create(
                model=self.model,
                messages=request.chat(),  # type: ignore[arg-type]
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=request.max_tokens,
                seed=request.seed,
            )
        except (self.errors.APIConnectionError, self.errors.APITimeoutError) as err:
            raise MlgenError(f"the LLM server at {self.base_url} stopped answering: {err}") from None
        except self.errors.APIStatusError as err:
            self.failures[str(err.status_code)] = self.failures.get(str(err.status_code), 0) + 1
            return None
        choices = getattr(response, "choices", None) or []
        content = choices[0].message.content if choices and choices[0].message else None
        return content if isinstance(content, str) else None

    def complete(self, requests: Sequence[ChatRequest]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests))


def check_llm(name: str) -> None:
    """Fail at once on an LLM that cannot be used (missing vLLM or openai, unknown id)."""
    from mlgen.models.registry import causal_lm_folder

    if name == TEMPLATE:
        return
    if name.startswith("openai:"):
        if not name.removeprefix("openai:"):
            raise MlgenError("--llm openai:MODEL needs a model name, e.g. openai:gpt-4o-mini")
        if importlib.util.find_spec("openai") is None:
            raise MlgenError("--llm openai:... needs the openai client: pip install openai")
        return
    if name.startswith("vllm:"):
        if importlib.util.find_spec("vllm") is None:
            raise MlgenError("--llm vllm:... needs vLLM: pip install 'mlgen[vllm]'")
        name = name.removeprefix("vllm:")
    causal_lm_folder(name)


def make_backend(
    name: str,
    device: torch.device,
    batch_size: int = 16,
    base_url: str | None = None,
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 3,
) -> Backend:
    if name.startswith("openai:"):
        backend = OpenAIBackend(name.removeprefix("openai:"), base_url, concurrency, timeout, retries)
        backend.check()
        return backend
    if name.startswith("vllm:"):
        return VllmBackend(name.removeprefix("vllm:"))
    return TransformersBackend(name, device, batch_size)
