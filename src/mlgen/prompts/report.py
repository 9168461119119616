"""``prompts/report.json``: how many prompts, from where, what was rejected and how diverse they are.

Every figure is given for the stage's prompts and, beside them, for the template-only prompt set
(the paper's sentence, one per label set) as the baseline.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Any

import numpy as np

from mlgen.prompts.composer import template_prompt
from mlgen.prompts.validate import Embedder


def distinct_2(texts: list[str]) -> float | None:
    """Distinct word bigrams over all bigrams (1.0: no bigram repeats anywhere)."""
    grams = [tuple(w[i : i + 2]) for w in (t.lower().split() for t in texts) for i in range(len(w) - 1)]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def within_set_distance(texts_by_set: dict[int, list[str]], embedder: Embedder | None) -> float | None:
    """Mean pairwise cosine distance (1 - cosine) of MiniLM embeddings within a set, averaged over sets."""
    if embedder is None:
        return None
    means = []
    for texts in texts_by_set.values():
        if len(texts) < 2:
            continue
        vectors = embedder(texts)
        sims = vectors @ vectors.T
        upper = sims[np.triu_indices(len(texts), k=1)]
        means.append(float(1 - upper.mean()))
    return round(float(np.mean(means)), 4) if means else None


def figures(rows: list[dict[str, Any]], classes: list[str], n_sets: int, embedder: Embedder | None) -> dict[str, Any]:
    by_set: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        by_set[row["set_id"]].append(row["text"])
    per_set = [len(by_set.get(i, [])) for i in range(n_sets)]
    covered = {label for row in rows for label in row["labels"]}
    per_label = Counter(label for row in rows for label in row["labels"])
    return {
        "prompts": len(rows),
        "prompts_per_set": {"mean": round(float(np.mean(per_set)), 3), "min": min(per_set), "max": max(per_set)},
        "distinct_2": distinct_2([row["text"] for row in rows]),
        "within_set_distance": within_set_distance(by_set, embedder),
        "label_coverage": round(len(covered & set(classes)) / len(classes), 4),
        "prompts_per_label": {"min": min(per_label[c] for c in classes), "max": max(per_label[c] for c in classes)},
    }


def prompt_report(
    label_sets: list[tuple[str, ...]],
    rows: list[dict[str, Any]],
    classes: list[str],
    totals: Counter,
    synonym_file: dict[str, Any],
    embedder: Embedder | None,
    config: Any,
    method: str,
) -> dict[str, Any]:
    from_llm = [row for row in rows if row["source"] != "template"]
    template_rows = [
        {"set_id": i, "labels": list(s), "text": template_prompt(s), "source": "template"}
        for i, s in enumerate(label_sets)
    ]
    candidates = totals.get("candidates", 0)
    rejected = {k.removeprefix("rejected_"): v for k, v in sorted(totals.items()) if k.startswith("rejected_")}
    llm_rows = [r for r in rows if r["source"] != "template"]
    return {
        "llm": config.llm,
        "prompt_style": config.prompt_template or config.prompt_style,
        "label_sets": {"count": len(label_sets), "method": method},
        "requests": {
            "total": totals.get("requests", 0),
            "answered_from_cache": totals.get("cache_hits", 0),
            "synonym_requests": synonym_file.get("requests", 0),
        },
        "answers": {
            "candidates": candidates,
            "accepted": totals.get("accepted", 0),
            "surplus": totals.get("surplus", 0),  # valid answers beyond what the set needed
            "accepted_share": round((totals.get("accepted", 0) + totals.get("surplus", 0)) / candidates, 4)
            if candidates
            else None,
            "rejected": rejected,
        },
        "share_from_llm": round(len(from_llm) / len(rows), 4) if rows else 0.0,
        "share_from_template": round(1 - len(from_llm) / len(rows), 4) if rows else 0.0,
        "template_filled_sets": totals.get("template_filled_sets", 0),
        "prompts": figures(rows, classes, len(label_sets), embedder),
        "llm_prompts_only": figures(llm_rows, classes, len(label_sets), embedder) if llm_rows else None,
        "template_only": figures(template_rows, classes, len(label_sets), embedder),
        "synonyms": {
            "per_label": {label: len(words) for label, words in synonym_file.get("synonyms", {}).items()},
            "sources": dict(Counter(s for sources in synonym_file.get("sources", {}).values() for s in sources)),
            "rejected": synonym_file.get("rejected", {}),
            "threshold": config.synonym_threshold,
        },
        "settings": {k: v for k, v in asdict(config).items() if k not in ("negative_prompt", "label_sets")},
    }
