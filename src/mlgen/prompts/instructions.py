"""Instructions: editable YAML template files that turn a label set into chat messages.

A template file has ``messages`` (a list of ``role: text`` turns), optionally ``single`` (the turns
for a one-label set) and ``answers``: ``one`` (a request asks for one sentence) or ``list`` (a
request asks for ``{n}`` lines, the paper's way). Shipped styles live in ``templates/``:
``mlgen`` (default, few-shot), ``paper`` (Diff-ZS-MLC's painter dialog), ``plain`` (mlgen's old
instruction). Placeholders are checked when the stage starts.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from mlgen.errors import MlgenError

TEMPLATES = Path(__file__).parent / "templates"
STYLES = ("mlgen", "paper", "plain")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Instruction:
    name: str
    answers: str  # "one" or "list"
    messages: tuple[tuple[str, str], ...]
    single: tuple[tuple[str, str], ...]

    def render(self, fields: dict[str, str], single: bool = False) -> tuple[tuple[str, str], ...]:
        """The chat turns with the placeholders filled (``single``: the one-label variant if any)."""
        turns = self.single if single and self.single else self.messages
        return tuple((role, text.format(**fields)) for role, text in turns)


def _turns(raw: object, where: str, allowed: set[str], required: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise MlgenError(f"{where}: 'messages' must be a list of turns like '- user: TEXT'")
    turns = []
    for turn in raw:
        if not (isinstance(turn, dict) and len(turn) == 1):
            raise MlgenError(f"{where}: each turn is one 'role: text' pair, got {turn!r}")
        ((role, text),) = turn.items()
        if role not in ROLES or not isinstance(text, str):
            raise MlgenError(f"{where}: a turn's role is system, user or assistant with a text, got {role!r}")
        turns.append((role, text))
    if turns[-1][0] != "user":
        raise MlgenError(f"{where}: the last turn must be the user's request")
    found = set()
    for _, text in turns:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
        except ValueError as err:
            raise MlgenError(f"{where}: {err} (write literal braces as {{{{ and }}}})") from None
        unknown = names - allowed
        if unknown:
            raise MlgenError(f"{where}: unknown placeholder {{{sorted(unknown)[0]}}} (known: {sorted(allowed)})")
        found |= names
    if required not in found:
        raise MlgenError(f"{where}: the template has no {{{required}}} placeholder")
    return tuple(turns)


def load_instruction(
    style: str, template: str | None = None, allowed: tuple[str, ...] = ("objects", "n"), required: str = "objects"
) -> Instruction:
    """The instruction of ``--prompt-template FILE`` if given, else of ``--prompt-style``."""
    if template is None and style not in (*STYLES, "synonyms"):
        raise MlgenError(f"unknown prompt style '{style}' (known: {', '.join(STYLES)})")
    path = Path(template) if template else TEMPLATES / f"{style}.yaml"
    if not path.is_file():
        raise MlgenError(f"prompt template not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise MlgenError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MlgenError(f"{path}: a prompt template is a mapping with 'messages' (see {TEMPLATES / 'mlgen.yaml'})")
    answers = data.get("answers", "one")
    if answers not in ("one", "list"):
        raise MlgenError(f"{path}: 'answers' is one or list, got {answers!r}")
    messages = _turns(data.get("messages"), str(path), set(allowed), required)
    single = _turns(data["single"], f"{path} (single)", set(allowed), required) if data.get("single") else ()
    return Instruction(path.stem, answers, messages, single)


def article(label: str) -> str:
    return f"{'an' if label[:1].lower() in 'aeiou' else 'a'} {label}"


def objects_phrase(labels: tuple[str, ...]) -> str:
    """'a zebra', 'a zebra and a kite', 'a zebra, a kite and an apple'."""
    named = [article(label) for label in labels]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def scene_fields(labels: tuple[str, ...], n: int) -> dict[str, str]:
    return {"objects": objects_phrase(labels), "n": str(n)}


def clean_line(text: str) -> str:
    """A line without list numbering, bullets, 'Caption:' headers or quotes."""
    line = re.sub(r"^\s*(\d+\s*[.):]|[-*•])\s*", "", text.strip())
    line = re.sub(r"^(caption|phrase|sentence|answer)\s*\d*\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"“”'").strip()


def answer_lines(answer: str, answers: str) -> list[str]:
    """The candidate prompts in one answer: its first line (``one``) or every line (``list``).

    A JSON answer (vLLM's structured output) gives its strings.
    """
    text = answer.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            values = [v for value in data.values() for v in (value if isinstance(value, list) else [value])]
            return [clean_line(v) for v in values if isinstance(v, str) and v.strip()]
    lines = [clean_line(line) for line in text.splitlines() if clean_line(line)]
    return lines[:1] if answers == "one" else lines


def json_schema(answers: str) -> dict[str, object]:
    """The structured-output schema matching an instruction's answers (vLLM)."""
    if answers == "one":
        return {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"]}
    return {
        "type": "object",
        "properties": {"phrases": {"type": "array", "items": {"type": "string"}}},
        "required": ["phrases"],
    }
