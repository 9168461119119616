"""The prompt stage: label sets, validated LLM scene prompts and synonyms, written as Parquet tables.

Synonyms come first (in ``setup``, once, through the request cache): the prompt checks accept a
label's synonyms and the user's aliases (``--label-aliases``), and refuse other labels' ones. Each
shard then asks for the prompts of its label sets: up to ``max_attempts`` rounds, each with new seeds
for the sets still short, then the template sentence fills a set left short (``source=template``).
``finish`` merges the shards and writes ``report.json`` (see :mod:`mlgen.prompts.report`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mlgen.config import PromptsConfig
from mlgen.labels import alias_setting, aliases_from_mapping
from mlgen.paths import write_json_atomic
from mlgen.pipeline.ranks import Ranks
from mlgen.pipeline.rundir import RunDir
from mlgen.pipeline.runner import Stage
from mlgen.prompts.backends import TEMPLATE, Backend, ChatRequest, RequestCache, make_backend, request_seed
from mlgen.prompts.composer import compose_sets, template_prompt
from mlgen.prompts.instructions import answer_lines, json_schema, load_instruction, scene_fields
from mlgen.prompts.lexicon import LEXICON, lexicon_names, wordnet_folder
from mlgen.prompts.report import prompt_report
from mlgen.prompts.validate import Embedder, PromptValidator, clean_synonym, validate_synonyms
from mlgen.shards.writer import write_parquet_atomic

PART_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "prompt"
        ("set_id", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("text", pa.string()),
        ("source", pa.string()),
        ("model", pa.string()),
        ("attempt", pa.int64()),
    ]
)
LABEL_SETS_SCHEMA = pa.schema([("set_id", pa.int64()), ("labels", pa.list_(pa.string())), ("method", pa.string())])
PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("set_id", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("text", pa.string()),
        ("negative_text", pa.string()),
        ("source", pa.string()),  # llm:NAME or template
        ("model", pa.string()),  # the LLM ('' for the template)
        ("attempt", pa.int64()),  # the request round that wrote it (-1: the template)
    ]
)
# source: label, wordnet:synonym (a lemma of the label's sense), wordnet:kind (a hyponym's), or llm:NAME
SYNONYMS_SCHEMA = pa.schema([("label", pa.string()), ("synonym", pa.string()), ("source", pa.string())])
SYNONYM_SAMPLES = 2  # synonym requests per label and round (different seeds); all answers are pooled
SYNONYM_ROUNDS = 2  # rounds of SYNONYM_SAMPLES requests; round 2 only for the labels still short of --synonyms
CACHE_FOLDER = "llm-cache"  # RUN/llm-cache: outside prompts/, so --overwrite keeps the answers


class PromptStage(Stage):
    """Shards of label sets; merged into label_sets, prompts and synonyms tables and a report."""

    name = "prompts"
    config_section = "prompts"

    def __init__(self, run: RunDir, config: PromptsConfig, classes: list[str]) -> None:
        # The aliases are checked against the labels (a config file's setting too) and recorded normalised.
        self.aliases = aliases_from_mapping(config.label_aliases, "setting 'label_aliases'", classes)
        super().__init__(run, dataclasses.replace(config, label_aliases=alias_setting(self.aliases)))
        self.classes = classes
        self.label_sets, self.method = compose_sets(
            classes, config.exclude_pairs, config.set_size, config.sets_per_label, config.label_sets, config.seed
        )
        # Both instructions are read and checked now: a bad template fails before any work.
        self.instruction = load_instruction(config.prompt_style, config.prompt_template)
        self.synonym_instruction = load_instruction("synonyms", allowed=("label", "n"), required="label")
        if config.synonyms_per_label and config.synonym_source != "llm":
            wordnet_folder()  # a missing lexicon fails before any work too
        self.backend: Backend | None = None
        self.cache: RequestCache | None = None
        self.embedder: Embedder | None = None
        self.synonyms: dict[str, list[str]] = {}

    @property
    def uses_llm(self) -> bool:
        return self.config.llm != TEMPLATE

    def settings(self) -> dict[str, Any]:
        instruction = [list(turn) for turn in self.instruction.messages + self.instruction.single]
        return {**super().settings(), "classes": self.classes, "instruction": instruction}

    def plan(self) -> list[dict[str, Any]]:
        self.run.write_classes(self.classes)  # only reached when the settings check passed
        size = self.config.sets_per_shard
        return [
            {"shard": number, "kind": "prompt", "start": start, "end": min(start + size, len(self.label_sets))}
            for number, start in enumerate(range(0, len(self.label_sets), size))
        ]

    def setup(self, ranks: Ranks) -> None:
        if self.uses_llm:
            c = self.config
            self.backend = make_backend(
                c.llm, ranks.device, c.batch_size, c.llm_base_url, c.concurrency, c.request_timeout, c.request_retries
            )
            self.cache = RequestCache(self.run.root / CACHE_FOLDER)
            self.embedder = Embedder(ranks.device)
        self.synonyms = self._synonyms()

    # --- synonyms -------------------------------------------------------------------------------

    def _synonyms(self) -> dict[str, list[str]]:
        """The validated synonyms (RUN/prompts/parts/synonyms.json, made once).

        The lexicon's names come first; the LLM is asked only for the labels they leave short of
        ``synonyms_per_label``, and every candidate goes through the same validation.
        """
        path = self.folder / "parts" / "synonyms.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["synonyms"]
        n, source = self.config.synonyms_per_label, self.config.synonym_source
        lexicon = lexicon_names(self.classes) if n and source in ("lexicon", "both") else {}
        raw: dict[str, list[str]] = {label: [] for label in self.classes}
        origin: dict[str, dict[str, str]] = {label: {} for label in self.classes}  # word -> where it came from
        for label, names in lexicon.items():
            for words, kind in ((names.synonyms, "synonym"), (names.kinds, "kind")):
                raw[label] += words
                for word in map(clean_synonym, words):
                    origin[label].setdefault(word, f"{LEXICON}:{kind}")
        kinds = {label: {clean_synonym(w) for w in names.kinds} for label, names in lexicon.items()}
        trusted = {label: {clean_synonym(w) for w in names.synonyms} for label, names in lexicon.items()}
        if self.embedder is None and any(raw.values()):
            self.embedder = Embedder(self.run_device())  # the meaning checks (loaded with the LLM otherwise)
        rejected: Counter = Counter()
        synonyms = self._validate(raw, kinds, trusted, rejected)
        requests = 0
        if self.backend is not None and self.cache is not None and n and source in ("llm", "both"):
            short = [label for label in self.classes if len(synonyms[label]) < n]
            for round_ in range(SYNONYM_ROUNDS):  # a small LLM's answers are mostly refused: sample more
                if not short:
                    break
                seeds = range(round_ * SYNONYM_SAMPLES, (round_ + 1) * SYNONYM_SAMPLES)
                labels = [label for label in short for _ in seeds]
                asks = [
                    self._request(
                        self.synonym_instruction.render({"label": label, "n": str(n)}), ("synonyms", label, j)
                    )
                    for label in short
                    for j in seeds
                ]
                requests += len(asks)
                for label, answer in zip(labels, self.cache.complete(self.backend, asks), strict=True):
                    if answer:
                        raw[label].append(answer)
                rejected = Counter()  # the counts of the last validation, over every answer so far
                synonyms = self._validate(raw, kinds, trusted, rejected)
                short = [label for label in self.classes if len(synonyms[label]) < n]
        llm = f"llm:{self.config.llm}"
        sources = {label: [origin[label].get(word, llm) for word in words] for label, words in synonyms.items()}
        senses = {label: names.sense.gloss if names.sense else None for label, names in lexicon.items()}
        write_json_atomic(
            path,
            {
                "synonyms": synonyms,
                "sources": sources,
                "senses": senses,
                "rejected": dict(rejected),
                "requests": requests,
            },
        )
        return synonyms

    def _validate(
        self, raw: dict[str, list[str]], kinds: dict[str, set[str]], trusted: dict[str, set[str]], rejected: Counter
    ) -> dict[str, list[str]]:
        n, threshold = self.config.synonyms_per_label, self.config.synonym_threshold
        return validate_synonyms(raw, n, self.embedder, threshold, rejected, self.aliases, kinds, trusted)

    # --- scene prompts --------------------------------------------------------------------------

    def _request(self, messages: tuple[tuple[str, str], ...], key: tuple[Any, ...], max_tokens: int = 0) -> ChatRequest:
        assert self.backend is not None
        return ChatRequest(
            messages=messages,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            max_tokens=max_tokens or self.config.max_new_tokens,
            seed=request_seed(self.config.seed, *key),
            json_schema=json_schema(self.instruction.answers)
            if self.backend.kind == "vllm" and key[0] != "synonyms"
            else None,
        )

    def _scene_requests(self, label_set: tuple[str, ...], missing: int, attempt: int) -> list[ChatRequest]:
        """This round's requests for a set still ``missing`` prompts; seeds from the set and the round."""
        n = self.config.prompts_per_set
        messages = self.instruction.render(scene_fields(label_set, n), single=len(label_set) == 1)
        if self.instruction.answers == "list":  # one answer holds n lines
            return [self._request(messages, (label_set, attempt, 0), self.config.max_new_tokens * n)]
        return [self._request(messages, (label_set, attempt, j)) for j in range(math.ceil(1.5 * missing))]

    def _llm_prompts(self, sets: list[tuple[str, ...]], stats: Counter) -> list[list[tuple[str, int]]]:
        assert self.backend is not None and self.cache is not None
        validator = PromptValidator(
            self.classes,
            self.synonyms,
            self.embedder,
            self.config.min_words,
            self.config.max_words,
            self.config.dedup_threshold,
            self.aliases,
        )
        n = self.config.prompts_per_set
        accepted: list[list[tuple[str, int]]] = [[] for _ in sets]
        rejected: Counter = Counter()
        for attempt in range(self.config.max_attempts):
            short = [i for i in range(len(sets)) if len(accepted[i]) < n]
            if not short:
                break
            asks = {i: self._scene_requests(sets[i], n - len(accepted[i]), attempt) for i in short}
            flat = [r for i in short for r in asks[i]]
            hits_before = self.cache.hits
            answers = iter(self.cache.complete(self.backend, flat))
            stats["requests"] += len(flat)
            stats["cache_hits"] += self.cache.hits - hits_before
            for i in short:
                candidates: list[str] = []
                for _ in asks[i]:
                    answer = next(answers)
                    if answer is None:
                        rejected["request_failed"] += 1
                        continue
                    lines = answer_lines(answer, self.instruction.answers)
                    if not lines:
                        rejected["empty"] += 1
                    candidates += lines
                stats["candidates"] += len(candidates)
                texts = [t for t, _ in accepted[i]]
                passing = validator.select(candidates, sets[i], texts, rejected)
                chosen = passing[: n - len(texts)]
                stats["accepted"] += len(chosen)
                stats["surplus"] += len(passing) - len(chosen)  # valid, but the set was full
                accepted[i] += [(text, attempt) for text in chosen]
        stats.update({f"rejected_{reason}": count for reason, count in rejected.items()})
        return accepted

    def run_shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        start, end = shard["start"], shard["end"]
        sets = self.label_sets[start:end]
        stats: Counter = Counter()
        written = self._llm_prompts(sets, stats) if self.uses_llm else [[] for _ in sets]
        model = self.backend.model if self.backend is not None else ""
        rows: list[dict[str, Any]] = []
        for set_id, label_set, prompts in zip(range(start, end), sets, written, strict=True):
            base = dict(kind="prompt", set_id=set_id, labels=list(label_set))
            rows += [dict(base, text=t, source=f"llm:{self.config.llm}", model=model, attempt=a) for t, a in prompts]
            if len(prompts) < self.config.prompts_per_set:  # the template fills a short set (once)
                stats["template_filled_sets"] += self.uses_llm
                rows.append(dict(base, text=template_prompt(label_set), source=TEMPLATE, model="", attempt=-1))
        write_parquet_atomic(self.folder / "parts" / f"{shard['shard']:05d}.parquet", rows, PART_SCHEMA)
        from_llm = sum(row["source"] != TEMPLATE for row in rows)
        return {"kind": "prompt", "rows": len(rows), "from_llm": from_llm, **stats}

    def finish(self, stats: list[dict[str, Any]]) -> dict[str, Any]:
        parts = pa.concat_tables(
            pq.read_table(self.folder / "parts" / f"{s['shard']:05d}.parquet", schema=PART_SCHEMA) for s in stats
        ).to_pylist()
        prompt_rows = [
            dict(
                prompt_id=i,
                set_id=r["set_id"],
                labels=r["labels"],
                text=r["text"],
                negative_text=self.config.negative_prompt,
                source=r["source"],
                model=r["model"],
                attempt=r["attempt"],
            )
            for i, r in enumerate(parts)
        ]
        synonym_file = json.loads((self.folder / "parts" / "synonyms.json").read_text(encoding="utf-8"))
        synonym_rows = []
        for label in self.classes:
            synonym_rows.append(dict(label=label, synonym=label, source="label"))
            words = synonym_file["synonyms"][label]
            sources = synonym_file.get("sources", {}).get(label) or [f"llm:{self.config.llm}"] * len(words)
            synonym_rows += [dict(label=label, synonym=w, source=s) for w, s in zip(words, sources, strict=True)]
        set_rows = [dict(set_id=i, labels=list(s), method=self.method) for i, s in enumerate(self.label_sets)]
        write_parquet_atomic(self.folder / "label_sets.parquet", set_rows, LABEL_SETS_SCHEMA)
        write_parquet_atomic(self.folder / "prompts.parquet", prompt_rows, PROMPTS_SCHEMA)
        write_parquet_atomic(self.folder / "synonyms.parquet", synonym_rows, SYNONYMS_SCHEMA)
        totals: Counter = Counter()
        for shard_stats in stats:
            totals.update({k: v for k, v in shard_stats.items() if isinstance(v, int) and k != "shard"})
        embedder = self.embedder or (Embedder(self.run_device()) if self.uses_llm else None)
        report = prompt_report(
            self.label_sets, prompt_rows, self.classes, totals, synonym_file, embedder, self.config, self.method
        )
        write_json_atomic(self.folder / "report.json", report)
        return {
            "label_sets": len(set_rows),
            "prompts": len(prompt_rows),
            "prompts_from_llm": sum(r["source"] != TEMPLATE for r in prompt_rows),
            "synonyms": len(synonym_rows),
            "requests": totals["requests"],
            "cache_hits": totals["cache_hits"],
        }

    @staticmethod
    def run_device() -> Any:
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
