"""``mlgen report`` shows the teacher's per-label reliability (filtered/reliability.json, issue 24): every
label's AUROC, best name, kept share, fallback count and gate (and after ``--prototype`` the blend's AUROC), in
the terminal and on the page."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import FAST_GENERATE, mlgen
from helpers import read_in_chromium

CLASSES = ["zebra", "kite", "hair <drier>"]  # a label with HTML in it: the page must escape it


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run filtered twice: the second time (from the cached embeddings) with the gate's cutoff
    between the labels' filter AUROCs, so that some labels are gated and some are not."""
    root = tmp_path_factory.mktemp("reliability")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    run = root / "run"
    for args in (["generate", "--classes", root / "classes.txt", *FAST_GENERATE], ["filter", "--min-keep", "0.5"]):
        done = mlgen(*args, "--run", run)
        assert done.returncode == 0, done.stderr
    aurocs = sorted(row["filter_auroc"] for row in reliability(run)["labels"])
    assert aurocs[0] < aurocs[-1], aurocs
    cutoff = round((aurocs[0] + aurocs[1]) / 2 if aurocs[0] < aurocs[1] else (aurocs[1] + aurocs[2]) / 2, 4)
    done = mlgen("filter", "--run", run, "--rescore", "--min-keep", "0.5", "--gate", str(cutoff))
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture(scope="module")
def proto_run(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``run`` decided again from its cached embeddings with ``--prototype 0.5`` (same rule and gate)."""
    copy = tmp_path_factory.mktemp("prototype") / "run"
    shutil.copytree(run, copy)
    cutoff = str(reliability(run)["cutoff"])
    done = mlgen("filter", "--run", copy, "--rescore", "--min-keep", "0.5", "--gate", cutoff, "--prototype", "0.5")
    assert done.returncode == 0, done.stderr
    return copy


def reliability(run: Path) -> dict:
    return json.loads((run / "filtered" / "reliability.json").read_text(encoding="utf-8"))


def terminal_rows(stdout: str, columns: int = 7) -> dict[str, list[str]]:
    """The printed table's body rows, label -> cells (rich draws │, or | where the output is not UTF-8); a line
    with no AUROC continues the row above it, whose names a narrow terminal wrapped."""
    rows: list[list[str]] = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│|]", line)[1:-1]]
        if len(cells) == columns and (cells[1] or not rows):
            rows.append(cells)
        elif len(cells) == columns:
            rows[-1] = [f"{above} {below}".strip() for above, below in zip(rows[-1], cells, strict=True)]
    return {cells[0]: cells for cells in rows}


def test_terminal_table_shows_every_label_with_its_auroc_and_gate(run: Path) -> None:
    done = mlgen("report", "--run", run)
    assert done.returncode == 0, done.stderr
    data = reliability(run)
    shown = re.search(r"rule (\w+), cutoff ([0-9.]+)", done.stdout)
    assert shown.group(1) == data["rule"] and float(shown.group(2)) == pytest.approx(data["cutoff"], abs=0.0006)
    rows = terminal_rows(done.stdout)
    assert set(rows) == {row["label"] for row in data["labels"]}
    for row in data["labels"]:
        _, auroc, best, filter_auroc, kept, fallback, gated = rows[row["label"]]
        assert float(auroc) == pytest.approx(row["reliability"], abs=0.0051)
        assert float(filter_auroc) == pytest.approx(row["filter_auroc"], abs=0.0051)
        assert best == row["best_name"] and fallback == str(row["fallback"])
        assert kept.startswith(f"{row['kept']}/{row['generated']} ")
        assert gated == ("GATED" if row["gated"] else "no"), row
    assert any(row["gated"] for row in data["labels"])  # the run must exercise the flag
    assert "GATED: not filtered on, the teacher cannot read this name" in done.stdout


# Appended to a copy of the page: after load, record the reliability table as the browser shows it (each
# row's class, background colour and visible cell texts) and the per-label gated notes.
READ_TABLE = (
    "<script>window.addEventListener('load', () => {"
    "const rows = [...document.querySelectorAll('#reliability tr')].slice(1).map(r => ({gated: r.className, "
    "colour: getComputedStyle(r.cells[0]).backgroundColor, cells: [...r.cells].map(c => c.innerText)}));"
    "document.body.dataset.rows = JSON.stringify(rows);"
    "document.body.dataset.head = JSON.stringify([...document.querySelectorAll('#reliability th')].map("
    "h => h.innerText));"
    "document.body.dataset.notes = JSON.stringify([...document.querySelectorAll('p.gated')].map("
    "p => p.previousElementSibling.innerText));});</script>"
)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_shows_the_reliability_table_in_chromium(run: Path, tmp_path: Path) -> None:
    done = mlgen("report", "--run", run)
    assert done.returncode == 0, done.stderr
    page = run / "report" / "index.html"
    text = page.read_text(encoding="utf-8")
    assert "<b>" not in text.split("<table id='reliability'>")[1].split("</table>")[0]
    dom, screenshot = read_in_chromium(page, READ_TABLE, tmp_path)
    shown = json.loads(html.unescape(re.search(r'data-rows="([^"]*)"', dom).group(1)))
    notes = json.loads(html.unescape(re.search(r'data-notes="([^"]*)"', dom).group(1)))
    data = reliability(run)
    by_label = {row["cells"][0]: row for row in shown}
    assert set(by_label) == {row["label"] for row in data["labels"]}  # "hair <drier>" as text, escaped
    for row in data["labels"]:
        cells = by_label[row["label"]]["cells"]
        assert float(cells[1]) == pytest.approx(row["reliability"], abs=0.0051)
        assert cells[2] == row["best_name"] and cells[6] == str(row["fallback"])
        assert float(cells[4]) == pytest.approx(row["filter_auroc"], abs=0.0051)
        for name in row["names"]:  # every name with its AUROC
            assert name["name"] in cells[3]
        if row["gated"]:
            assert cells[7].startswith("gated: not filtered on, the teacher cannot read this name"), cells
            assert by_label[row["label"]]["gated"] == "gated"
            assert by_label[row["label"]]["colour"] not in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)")
        else:
            assert cells[7] == "no" and by_label[row["label"]]["gated"] == ""
    assert sorted(notes) == sorted(row["label"] for row in data["labels"] if row["gated"])
    assert notes, "the run must exercise the flag"
    # a kept image says why when it was kept by the fallback, not by the rule
    assert sum(row["fallback"] for row in data["labels"]) > 0, "the run must exercise the fallback"
    assert "· kept: fallback" in text
    assert screenshot.stat().st_size > 10_000


def test_terminal_shows_the_prototype_auroc_only_for_a_blended_run(run: Path, proto_run: Path) -> None:
    done = mlgen("report", "--run", proto_run)
    assert done.returncode == 0, done.stderr
    data = reliability(proto_run)
    assert data["prototype"] == 0.5 and "prototype 0.5" in done.stdout
    rows = terminal_rows(done.stdout, columns=8)
    assert set(rows) == {row["label"] for row in data["labels"]}
    for row in data["labels"]:
        _, _, _, filter_auroc, prototype_auroc, kept, _, gated = rows[row["label"]]
        assert float(filter_auroc) == pytest.approx(row["filter_auroc"], abs=0.0051)
        assert float(prototype_auroc) == pytest.approx(row["prototype_auroc"], abs=0.0051)
        assert kept.startswith(f"{row['kept']}/{row['generated']} ") and gated == ("GATED" if row["gated"] else "no")
    # the blend must move some label's AUROC, so that the column cannot pass for a copy of the text's
    assert any(abs(row["prototype_auroc"] - row["filter_auroc"]) > 0.01 for row in data["labels"])
    plain = mlgen("report", "--run", run)  # prototype 0: the table as before, no empty column
    assert plain.returncode == 0, plain.stderr
    assert "prototype" not in plain.stdout and len(terminal_rows(plain.stdout)) == len(CLASSES)


def page_table(run: Path, tmp_path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The reliability table of ``run``'s report as chromium shows it: its header, and label -> cells."""
    done = mlgen("report", "--run", run)
    assert done.returncode == 0, done.stderr
    dom, _ = read_in_chromium(run / "report" / "index.html", READ_TABLE, tmp_path)
    head = json.loads(html.unescape(re.search(r'data-head="([^"]*)"', dom).group(1)))
    shown = json.loads(html.unescape(re.search(r'data-rows="([^"]*)"', dom).group(1)))
    return head, {row["cells"][0]: row["cells"] for row in shown}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_page_shows_the_prototype_auroc_only_for_a_blended_run(run: Path, proto_run: Path, tmp_path: Path) -> None:
    head, rows = page_table(proto_run, tmp_path / "blended")
    assert head[4:6] == ["filter AUROC", "prototype AUROC"] and len(head) == 9, head
    data = reliability(proto_run)
    assert set(rows) == {row["label"] for row in data["labels"]}
    for row in data["labels"]:
        cells = rows[row["label"]]
        assert float(cells[4]) == pytest.approx(row["filter_auroc"], abs=0.0051)
        assert float(cells[5]) == pytest.approx(row["prototype_auroc"], abs=0.0051)
        assert cells[7] == str(row["fallback"]), cells
    assert "prototype 0.5" in (proto_run / "report" / "index.html").read_text(encoding="utf-8")
    head, rows = page_table(run, tmp_path / "plain")
    assert "prototype AUROC" not in head and len(head) == 8 and all(len(cells) == 8 for cells in rows.values())


def test_a_run_without_the_file_says_so_in_one_line(run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "filtered" / "reliability.json").unlink()  # a run filtered before issue 24
    done = mlgen("report", "--run", old)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("reliability: none (no filtered/reliability.json") and len(lines) == 2
    assert "reliability: none (no filtered/reliability.json" in (old / "report" / "index.html").read_text("utf-8")


def test_a_malformed_file_is_one_line_and_writes_nothing(run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    shutil.rmtree(bad / "report", ignore_errors=True)
    (bad / "filtered" / "reliability.json").write_text('{"rule": "exact", "labels": [{"label": 1}]}', "utf-8")
    done = mlgen("report", "--run", bad)
    assert done.returncode == 1 and "not a reliability file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (bad / "report").exists() and not list(bad.glob(".report*"))


def test_a_prototype_that_is_not_a_weight_is_one_line_and_writes_nothing(proto_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(proto_run, bad)
    shutil.rmtree(bad / "report", ignore_errors=True)
    path = bad / "filtered" / "reliability.json"
    path.write_text(json.dumps({**reliability(proto_run), "prototype": "0.5"}), encoding="utf-8")
    done = mlgen("report", "--run", bad)
    assert done.returncode == 1 and "prototype '0.5' is not a weight between 0 and 1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (bad / "report").exists() and not list(bad.glob(".report*"))
