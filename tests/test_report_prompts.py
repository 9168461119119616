"""``mlgen report``'s prompt section: the prompt report as tables (it was a raw JSON dump)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from conftest import mlgen
from mlgen.report import _prompt_section


class Tables(HTMLParser):
    """Every table of a page as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.pre = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_prompt_report_is_tables(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("zebra\nkite\nhair <drier>\n", encoding="utf-8")
    done = mlgen("prompts", "--run", "R", "--classes", "c.txt", "--llm", "template", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "R" / "prompts" / "report.json").read_text(encoding="utf-8"))
    section = _prompt_section(tmp_path / "R")
    page = Tables()
    page.feed(section)
    assert page.pre == 0 and "{" not in section, "the report is still a JSON dump"
    cells = {row[0]: row[1:] for table in page.tables for row in table if row}
    assert cells["LLM"] == ["template"]
    assert cells["label sets"] == [f"{report['label_sets']['count']} ({report['label_sets']['method']})"]
    assert cells["requests"] == [str(report["requests"]["total"])]
    # the diversity figures beside the template-only baseline, one column each
    assert cells["figure"] == ["these prompts", "template only (baseline)"]
    prompts, template = report["prompts"], report["template_only"]
    assert cells["prompts"] == [str(prompts["prompts"]), str(template["prompts"])]
    assert cells["label coverage"] == ["1", "1"]
    per_set = prompts["prompts_per_set"]
    shown = set(cells["prompts per set"][0].split(", "))
    assert shown == {f"mean {per_set['mean']:g}", f"min {per_set['min']}", f"max {per_set['max']}"}
    # one synonym row per label (the template asks no LLM: none), the label text escaped
    assert cells["label"] == ["synonyms", "words"]
    assert cells["hair <drier>"] == ["0", "-"] and "hair &lt;drier&gt;" in section
    assert cells["prompts_per_set"] == [str(report["settings"]["prompts_per_set"])]
