"""The filter's text side over a whole run: each label's names, their reliability, and the scores the filter uses.

A label's names are its own, the prompt stage's synonyms and the user's aliases. Each name's
reliability is the AUROC of the teacher's cosine to it between the images generated for the label
and the others: no annotation needed, and a name the teacher cannot read scores near or below 0.5.
With ``--prototype W`` the scores blend each label's text with its image prototype (leave-one-out), but the
gate keeps reading the text alone: the blend's own AUROC is recorded apart (``prototype_auroc``).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import pyarrow.parquet as pq
import torch
from torch import Tensor

from mlgen.config import FilterConfig
from mlgen.errors import MlgenError
from mlgen.filters.decide import column_aurocs, prototype_cosines
from mlgen.filters.discriminator import grouping_softmax
from mlgen.filters.s3 import s3_scores
from mlgen.labels import names_of
from mlgen.pipeline.rundir import RunDir


class Scorer(Protocol):
    """What the text side reads of the filter stage (which imports this module, not the other way round)."""

    config: FilterConfig
    classes: list[str]
    aliases: dict[str, list[str]]
    competitors: list[str]
    run: RunDir
    cache: Any  # the stage's embedding cache: load_text(key), save_text(key, scale, features)
    device: torch.device
    tokenizer: Any

    def clip(self) -> Any: ...


TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image showing a {}.", "a close-up photo of a {}.", "{}")
TEXT_SIDES = ("bare", "ensemble", "s3", "best")


class TextSide:
    """Scores [N, C] of a run's images under the stage's text side, and every name's AUROC."""

    def __init__(self, stage: Scorer, features: Tensor, requested: Tensor) -> None:
        self.stage, self.config, self.classes = stage, stage.config, stage.classes
        self.requested = requested
        self.synonyms = self.read_synonyms()
        self.names = [names_of(label, self.synonyms, stage.aliases) for label in self.classes]
        self.embeddings, self.scale = self.embed(self.texts())
        unit = features.float()
        self.name_aurocs = [
            column_aurocs(unit @ torch.stack([self.embeddings[n] for n in names]).T, requested[:, [c] * len(names)])
            for c, names in enumerate(self.names)
        ]
        self.scores = self.scale * self.cosines(unit)
        # the gate reads the names' own AUROC: a prototype-blended column separates a label's images almost by
        # construction (images asked for the same label resemble each other), so it cannot say whether to trust it
        self.filter_aurocs = column_aurocs(self.scores, requested)
        self.gated = torch.tensor(
            [a is not None and a < self.config.gate for a in self.filter_aurocs], device=features.device
        )
        self.prototype_aurocs: list[float | None] = [None] * len(self.classes)
        if self.config.prototype > 0:
            self.scores = self.scale * prototype_cosines(unit, self.columns(), requested, self.config.prototype)
            self.prototype_aurocs = column_aurocs(self.scores, requested)
        others = [self.embeddings[text] for text in self.competitor_texts()]
        self.competitor_count = len(others)
        self.competitor_scores = self.scale * unit @ torch.stack(others).T if others else unit.new_zeros(len(unit), 0)

    # --- names -------------------------------------------------------------------------------

    def read_synonyms(self) -> dict[str, list[str]]:
        """The prompt stage's synonyms per label (none when the prompt stage wrote none)."""
        path = self.stage.run.stage_dir("prompts") / "synonyms.parquet"
        if not path.is_file():
            if self.config.text == "s3":
                raise MlgenError(
                    f"--text s3 needs the prompt stage's synonyms: {path} is missing (run `mlgen prompts`)"
                )
            return {}
        words: dict[str, list[str]] = {}
        for row in pq.read_table(path, columns=["label", "synonym"]).to_pylist():
            words.setdefault(row["label"], []).append(row["synonym"])
        return words

    def own_names(self, c: int) -> list[str]:
        """The names the bare and ensemble sides average: the label and the user's aliases."""
        return names_of(self.classes[c], self.stage.aliases)

    def competitor_texts(self) -> list[str]:
        """Competitors are scored by their bare names, and the background prompt as written."""
        return list(self.stage.competitors) + ([self.config.background] if self.config.background else [])

    def templated(self, name: str) -> list[str]:
        return [t.format(name) for t in TEMPLATES] if self.config.text == "ensemble" else [name]

    def texts(self) -> list[str]:
        every = [name for names in self.names for name in names]
        every += [t for c in range(len(self.classes)) for name in self.own_names(c) for t in self.templated(name)]
        every += self.competitor_texts()
        return sorted(set(every))

    def embed(self, texts: list[str]) -> tuple[dict[str, Tensor], Tensor]:
        """Each text's normalised CLIP embedding (cached beside the image embeddings) and the logit scale."""
        key = json.dumps([self.config.clip, texts])
        cached = self.stage.cache.load_text(key)
        if cached is None:
            model, device = self.stage.clip(), self.stage.device
            with torch.inference_mode():
                features = model.encode_text(self.stage.tokenizer(texts).to(device))
            features = torch.nn.functional.normalize(features.float(), dim=-1)
            scale = model.logit_scale.exp().float().detach()
            self.stage.cache.save_text(key, scale, [features])
        else:
            scale, (features,) = cached
        features = features.to(self.requested.device)
        return dict(zip(texts, features, strict=True)), scale.to(self.requested.device)

    def mean_embedding(self, texts: list[str]) -> Tensor:
        return torch.nn.functional.normalize(torch.stack([self.embeddings[t] for t in texts]).mean(0), dim=-1)

    # --- scores ------------------------------------------------------------------------------

    def cosines(self, unit: Tensor) -> Tensor:
        """[N, C] under the text side: bare/ensemble average the label's own names (label, aliases) over the
        templates; s3 scores its synonym space; best reads its most reliable name."""
        if self.config.text == "s3":
            spaces = [torch.stack([self.embeddings[n] for n in names]) for names in self.names]
            return s3_scores(unit, spaces)
        return unit @ self.columns().T

    def columns(self) -> Tensor:
        """[C, D]: each label's unit text embedding under the bare, ensemble or best side (s3 has none)."""
        if self.config.text == "best":
            return torch.stack([self.embeddings[self.best_name(c)] for c in range(len(self.classes))])
        return torch.stack(
            [
                self.mean_embedding([t for name in self.own_names(c) for t in self.templated(name)])
                for c in range(len(self.classes))
            ]
        )

    def best_name(self, c: int) -> str:
        """The name whose score separates the label's images best (the label itself when none can be measured)."""
        aurocs = [a if a is not None else -1.0 for a in self.name_aurocs[c]]
        return self.names[c][max(range(len(aurocs)), key=lambda i: (aurocs[i], -i))]

    def teacher_probs(self) -> Tensor:
        """The grouping softmax over every label and competitor, ungated: [N, C]."""
        asked = torch.cat([self.requested, self.requested.new_zeros(len(self.requested), self.competitor_count)], 1)
        logits = torch.cat([self.scores, self.competitor_scores], dim=1)
        return grouping_softmax(logits, asked)[:, : len(self.classes)].clone()

    # --- the report ----------------------------------------------------------------------------

    def source(self, label: str, name: str) -> str:
        if name == label:
            return "label"
        return "alias" if name in self.stage.aliases.get(label, []) else "synonym"

    def reliability(self, kept: Tensor, added: Tensor) -> dict[str, Any]:
        """reliability.json: per label, every name's AUROC, the best one, the gate, and what the filter kept."""
        labels = []
        for c, label in enumerate(self.classes):
            mine = self.requested[:, c]
            aurocs = self.name_aurocs[c]
            labels.append(
                {
                    "label": label,
                    "generated": int(mine.sum()),
                    "kept": int((mine & kept).sum()),
                    "kept_share": round(float((mine & kept).sum() / mine.sum().clamp(min=1)), 4),
                    "fallback": int((mine & added).sum()),
                    "names": [
                        {"name": n, "source": self.source(label, n), "auroc": _round(a)}
                        for n, a in zip(self.names[c], aurocs, strict=True)
                    ],
                    "best_name": self.best_name(c),
                    "reliability": _round(max((a for a in aurocs if a is not None), default=None)),
                    "filter_auroc": _round(self.filter_aurocs[c]),
                    "prototype_auroc": _round(self.prototype_aurocs[c]),
                    "gated": bool(self.gated[c]),
                }
            )
        return {
            "clip": self.config.clip,
            "text": self.config.text,
            "rule": self.config.rule,
            "cutoff": self.config.gate or None,
            "min_keep": self.config.min_keep,
            "prototype": self.config.prototype,
            "competitors": list(self.stage.competitors) + ([self.config.background] if self.config.background else []),
            "labels": labels,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
