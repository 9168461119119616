"""``mlgen report``: one HTML page to LOOK at a run: per label, what the filter kept and dropped and why.

``RUN/report/index.html`` with, for every label, contact sheets of kept and of dropped images (with
the label's score and the reason), a histogram of the label's scores, and counts; then the prompt
report and the classifier's metrics when those stages have run. Image files are named by index,
never from user text, and every text shown is HTML-escaped.
"""

from __future__ import annotations

import html
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from mlgen.errors import MlgenError
from mlgen.filters.stage import image_of
from mlgen.pipeline.rundir import PLAN, RunDir
from mlgen.shards.reader import iter_shard

PER_SHEET = 12  # images per contact sheet
THUMBNAIL = 96  # pixels


def _decisions(run: RunDir) -> list[dict[str, Any]]:
    folder = run.stage_dir("filtered")
    run.require("filtered")
    shards = json.loads((folder / PLAN).read_text(encoding="utf-8"))["shards"]
    tables = [folder / f"{s['shard']:05d}_decisions.parquet" for s in shards]
    return [row for table in tables if table.is_file() for row in pq.read_table(table).to_pylist()]


def _chosen(decisions: list[dict[str, Any]], classes: list[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per label: the first kept and dropped decisions of images that asked for it."""
    sheets: dict[str, dict[str, list[dict[str, Any]]]] = {c: {"kept": [], "dropped": []} for c in classes}
    for row in decisions:
        for label in row["labels"]:
            side = sheets[label]["kept" if row["kept"] else "dropped"]
            if len(side) < PER_SHEET:
                side.append(row)
    return sheets


def _thumbnails(run: RunDir, keys: set[str], out: Path) -> dict[str, str]:
    """Write a thumbnail of every wanted raw sample as img/NNNNN.jpg; returns key -> relative path."""
    names: dict[str, str] = {}
    folder = run.stage_dir("raw")
    for shard in json.loads((folder / PLAN).read_text(encoding="utf-8"))["shards"]:
        for sample in iter_shard(folder, shard["shard"]):
            if sample["__key__"] in keys:
                image = Image.open(io.BytesIO(image_of(sample)[1])).convert("RGB")
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                names[sample["__key__"]] = f"img/{len(names):05d}.jpg"
                image.save(out / names[sample["__key__"]], quality=90)
    return names


def _histogram(values_kept: list[float], values_dropped: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, 2.0))
    bins = [i / 20 for i in range(21)]
    ax.hist([values_kept, values_dropped], bins=bins, stacked=True, label=["kept", "dropped"], color=["g", "r"])
    ax.set_xlabel("score of the label")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=80)
    plt.close(fig)


def _figure(row: dict[str, Any], label_index: int, thumbnails: dict[str, str]) -> str:
    score = row["scores"][label_index]
    reason = row.get("reason", "")  # a kept image can have one too: fallback, gated:<label>
    why = (f"kept: {reason}" if reason else "kept") if row["kept"] else reason or "dropped"
    return (
        f'<figure><img src="{thumbnails[row["key"]]}" alt="{html.escape(row["key"])}">'
        f"<figcaption>{score:.2f} · {html.escape(why)}</figcaption></figure>"
    )


def _metrics_section(root: Path, out: Path) -> str:
    metrics_file = root / "classifier" / "metrics.json"
    if not metrics_file.is_file():
        return ""
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    rows = []
    for name in ("zsl", "gzsl", "synthetic_heldout"):
        if name in metrics:
            rows.append(
                f"<tr><td>{name}</td><td>{metrics[name]['mAP']:.3f}</td><td>{metrics[name]['f1@3']:.3f}</td></tr>"
            )
    if "zero_shot_clip" in metrics:
        zs = metrics["zero_shot_clip"]["zsl"]
        rows.append(f"<tr><td>CLIP zero-shot (zsl)</td><td>{zs['mAP']:.3f}</td><td>{zs['f1@3']:.3f}</td></tr>")
    chart = root / "classifier" / "plots" / "per_class_ap.png"
    picture = ""
    if chart.is_file():
        shutil.copyfile(chart, out / "per_class_ap.png")
        picture = '<img src="per_class_ap.png" alt="per-class AP">'
    return (
        "<h2>Classifier</h2><table><tr><th>setting</th><th>mAP</th><th>F1@3</th></tr>"
        + "".join(rows)
        + f"</table>{picture}"
    )


def _cell(value: Any) -> str:
    """One table cell's text: '-' for nothing, floats to 3 digits, a mapping as 'key value' pairs."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() else f"{value:.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


PROMPT_FIGURES = [  # (key in the report's figures, shown as)
    ("prompts", "prompts"),
    ("prompts_per_set", "prompts per set"),
    ("distinct_2", "distinct 2-grams"),
    ("within_set_distance", "within-set distance"),
    ("label_coverage", "label coverage"),
    ("prompts_per_label", "prompts per label"),
]


def _prompt_section(root: Path) -> str:
    """prompts/report.json as tables: where the prompts came from, what was refused, how diverse they
    are beside the template-only baseline, the synonyms and the settings."""
    path = root / "prompts" / "report.json"
    if not path.is_file():
        return ""
    report = json.loads(path.read_text(encoding="utf-8"))
    requests, answers = report.get("requests", {}), report.get("answers", {})
    sets = report.get("label_sets", {})
    parts = ["<h2>Prompts</h2>"]
    overview = [
        ["LLM", report.get("llm")],
        ["prompt style", report.get("prompt_style")],
        ["label sets", f"{sets.get('count')} ({sets.get('method')})"],
        ["requests", requests.get("total")],
        ["answered from the cache", requests.get("answered_from_cache")],
        ["synonym requests", requests.get("synonym_requests")],
        ["answers (candidates)", answers.get("candidates")],
        ["accepted", answers.get("accepted")],
        ["valid beyond what a set needed", answers.get("surplus")],
        ["valid share", answers.get("accepted_share")],
        ["prompts from the LLM", report.get("share_from_llm")],
        ["prompts from the template", report.get("share_from_template")],
        ["sets the template filled", report.get("template_filled_sets")],
    ]
    parts.append(_table(["", "value"], overview))
    rejected = answers.get("rejected") or {}
    if rejected:
        parts.append("<h3>Refused answers</h3>")
        parts.append(_table(["reason", "answers"], sorted(rejected.items(), key=lambda kv: -kv[1])))
    arms = [(key, title) for key, title in (("prompts", "these prompts"), ("llm_prompts_only", "LLM prompts only"),
            ("template_only", "template only (baseline)")) if report.get(key)]  # fmt: skip
    if arms:
        parts.append("<h3>Diversity beside the template-only baseline</h3>")
        rows = [[title, *(report[key].get(name) for key, _ in arms)] for name, title in PROMPT_FIGURES]
        parts.append(_table(["figure", *(title for _, title in arms)], rows))
    synonyms = report.get("synonyms") or {}
    if synonyms.get("per_label"):
        words = _synonym_words(root)
        parts.append(f"<h3>Synonyms (MiniLM threshold {_cell(synonyms.get('threshold'))})</h3>")
        rows = [[label, count, words.get(label, [])] for label, count in synonyms["per_label"].items()]
        parts.append(_table(["label", "synonyms", "words"], rows))
        if synonyms.get("rejected"):
            refused = sorted(synonyms["rejected"].items(), key=lambda kv: -kv[1])
            parts.append(_table(["refused synonym: reason", "words"], [[k, v] for k, v in refused if v]))
    if report.get("settings"):
        parts.append("<h3>Settings</h3>")
        parts.append(_table(["setting", "value"], list(report["settings"].items())))
    return "".join(parts)


def _synonym_words(root: Path) -> dict[str, list[str]]:
    """label -> its synonyms, each with its source, from prompts/synonyms.parquet (empty when there is none)."""
    path = root / "prompts" / "synonyms.parquet"
    words: dict[str, list[str]] = {}
    if path.is_file():
        for row in pq.read_table(path).to_pylist():
            if row["source"] != "label":
                words.setdefault(row["label"], []).append(f"{row['synonym']} ({row['source']})")
    return words


RELIABILITY_KEYS = {"label", "generated", "kept", "kept_share", "fallback", "names", "best_name", "reliability"}
NO_RELIABILITY = "reliability: none (no filtered/reliability.json: an older run; filter again to see it)"


def gated_note(cutoff: Any) -> str:
    """What a gated label means, in one line."""
    return (
        f"gated: not filtered on, the teacher cannot read this name (filter AUROC below the cutoff {_cell(cutoff)}); "
        "its images are kept on the other labels' evidence"
    )


def read_reliability(root: Path) -> dict[str, Any] | None:
    """RUN/filtered/reliability.json, or None for a run filtered before it was written; a bad file is one line."""
    path = root / "filtered" / "reliability.json"
    return load_reliability(path) if path.is_file() else None


def load_reliability(path: Path) -> dict[str, Any]:
    """A reliability.json (``filter``'s, or ``finetune --names-from``'s): its contents, or one error line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MlgenError(f"{path}: not JSON ({err})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not (
        isinstance(labels, list)
        and {"rule", "cutoff"} <= data.keys()
        and all(isinstance(row, dict) and row.keys() >= RELIABILITY_KEYS | {"gated"} for row in labels)
        and all(isinstance(row["names"], list) for row in labels)
        and all(isinstance(n, dict) and "name" in n for row in labels for n in row["names"])
    ):
        expected = ", ".join(sorted(RELIABILITY_KEYS | {"gated"}))
        raise MlgenError(f"{path}: not a reliability file (rule, cutoff, and labels with {expected})")
    if not _is_weight(data.get("prototype", 0.0)):  # absent in a run filtered before --prototype existed
        raise MlgenError(f"{path}: prototype {data['prototype']!r} is not a weight between 0 and 1")
    return data


def _is_weight(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def _prototype(data: dict[str, Any]) -> float:
    """The filter's prototype weight: 0 when it was off, or for a run filtered before ``--prototype`` existed."""
    return float(data.get("prototype") or 0.0)


def _kept(row: dict[str, Any]) -> str:
    return f"{row['kept']}/{row['generated']} ({row['kept_share']:.0%})"


def _settings_line(data: dict[str, Any]) -> str:
    """The run's filter settings behind the figures: rule, gate cutoff, fallback share, teacher, text side."""
    cutoff = "off" if data["cutoff"] is None else _cell(data["cutoff"])
    line = (
        f"rule {data['rule']}, cutoff {cutoff}, min_keep {_cell(data.get('min_keep'))}, "
        f"CLIP {data.get('clip', '-')}, text {data.get('text', '-')}"
    )
    line += f", prototype {_cell(_prototype(data))}" if _prototype(data) else ""
    return line + (f", competitors {_cell(data['competitors'])}" if data.get("competitors") else "")


RELIABILITY_HELP = (
    "AUROC: of the teacher's score of the label's best name, between the images generated for the label and the "
    "others (0.5 is chance); filter AUROC: the same for the text the filter scored with (the gate reads it); "
    "fallback: kept images added back so that no label is emptied."
)
PROTOTYPE_HELP = (
    "prototype AUROC: the same for the text blended with the label's image prototype (weight {weight}), "
    "the scores the filter decided on."
)


def _help(data: dict[str, Any]) -> str:
    weight = _prototype(data)
    return RELIABILITY_HELP + (" " + PROTOTYPE_HELP.format(weight=_cell(weight)) if weight else "")


def _reliability_section(data: dict[str, Any] | None) -> str:
    """The teacher's reliability per label: AUROC of every name, the best one, the kept share, fallback, gate."""
    if data is None:
        return f"<h2>Teacher reliability</h2><p>{html.escape(NO_RELIABILITY)}</p>"
    blend = _prototype(data) > 0  # a column only when the blend was on: older runs keep their table
    header = ["label", "AUROC", "best name", "names (AUROC, source)", "filter AUROC"]
    header += ["prototype AUROC"] * blend + ["kept", "fallback", "gated"]
    rows = []
    for row in data["labels"]:
        names = "; ".join(f"{n['name']} {_cell(n.get('auroc'))} ({n.get('source', '-')})" for n in row["names"])
        cells = [row["label"], row["reliability"], row["best_name"], names, row.get("filter_auroc")]
        cells += [row.get("prototype_auroc")] * blend
        cells += [_kept(row), row["fallback"], gated_note(data["cutoff"]) if row["gated"] else "no"]
        flag = " class='gated'" if row["gated"] else ""
        rows.append(f"<tr{flag}>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in header)
    return (
        f"<h2>Teacher reliability</h2><p>{html.escape(_settings_line(data))}. {html.escape(_help(data))}</p>"
        f"<table id='reliability'><tr>{head}</tr>{''.join(rows)}</table>"
    )


def _summary_row(row: dict[str, Any], blend: bool) -> list[str]:
    figures = [_cell(row["reliability"]), row["best_name"], _cell(row.get("filter_auroc"))]
    figures += [_cell(row.get("prototype_auroc"))] * blend + [_kept(row)]
    return [row["label"], *figures, str(row["fallback"]), "GATED" if row["gated"] else "no"]


def reliability_summary(data: dict[str, Any] | None) -> list[Any]:
    """The terminal's view (rich renderables): one line when there is no file, else settings and a table."""
    from rich.table import Table
    from rich.text import Text

    if data is None:
        return [Text(NO_RELIABILITY)]
    blend = _prototype(data) > 0
    rows = [_summary_row(row, blend) for row in data["labels"]]
    headers = ["label", "AUROC", "best name", "filter\nAUROC", *["prototype\nAUROC"] * blend, "kept", "fallback"]
    table = Table()
    for i, header in enumerate([*headers, "gated"]):
        # a narrow terminal folds the names (user text), never cuts a figure or a word of a figure's header
        figure = 0 if i in (0, 2) else max(len(word) for word in [*header.split(), *(row[i] for row in rows)])
        table.add_column(header, overflow="fold", min_width=figure or None)
    for row in rows:  # Text(): label names are user text, never rich markup
        *figures, gated = row
        table.add_row(*map(Text, figures), Text(gated, style="bold red" if gated == "GATED" else ""))
    lines = [Text(f"reliability: {_settings_line(data)}"), table]
    if any(row["gated"] for row in data["labels"]):
        lines.append(Text(gated_note(data["cutoff"]).replace("gated", "GATED", 1)))
    return lines


STYLE = (
    "body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:2px;font-size:11px;text-align:center}"
    "figcaption{max-width:96px;overflow-wrap:anywhere}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
    "padding:2px 6px}.sheet{margin:4px 0 12px}tr.gated td,p.gated{background:#fdd;color:#900}"
)


def _generated(run: RunDir) -> list[str]:
    """A line on the generated images: how many, and the share with a single label (the draw's about 1/n²)."""
    counts = (run.success("raw") or {}).get("counts", {})
    if "single_label" not in counts:
        return []
    return [
        f"<p>{counts['images']} images generated; {counts['single_label']} single-label "
        f"({counts['single_label_share']:.1%}).</p>"
    ]


def build_report(run: RunDir) -> Path:
    """Write ``RUN/report/`` (built beside it and renamed into place); returns index.html."""
    classes = run.classes()
    decisions = _decisions(run)
    if not decisions:
        raise MlgenError(f"{run.root}: the filter has no decisions to show yet")
    reliability = read_reliability(run.root)  # a bad file stops here, before anything is written
    sheets = _chosen(decisions, classes)
    final = run.root / "report"
    build = run.root / f".report.tmp-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    (build / "img").mkdir(parents=True)
    wanted = {row["key"] for side in sheets.values() for rows in side.values() for row in rows}
    thumbnails = _thumbnails(run, wanted, build)
    parts = [f"<h1>mlgen run {html.escape(run.root.name)}</h1>"]
    parts += _generated(run)
    parts.append(_reliability_section(reliability))
    gated = {row["label"] for row in reliability["labels"] if row["gated"]} if reliability else set()
    for index, label in enumerate(classes):
        asked = [row for row in decisions if label in row["labels"]]
        kept = [row["scores"][index] for row in asked if row["kept"]]
        dropped = [row["scores"][index] for row in asked if not row["kept"]]
        _histogram(kept, dropped, build / f"hist_{index:03d}.png")
        parts.append(f"<h2>{html.escape(label)}</h2>")
        if label in gated:
            parts.append(f"<p class='gated'>{html.escape(gated_note(reliability['cutoff']))}</p>")
        parts.append(
            f"<p>{len(asked)} images asked for it: {len(kept)} kept, "
            f"{len(dropped)} dropped</p><img src='hist_{index:03d}.png' alt='scores'>"
        )
        for side in ("kept", "dropped"):
            figures = "".join(_figure(row, index, thumbnails) for row in sheets[label][side])
            parts.append(f"<div class='sheet'><b>{side}</b><br>{figures or '(none)'}</div>")
    parts.append(_prompt_section(run.root))
    parts.append(_metrics_section(run.root, build))
    page = f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
    (build / "index.html").write_text(page + "".join(parts) + "</body></html>", encoding="utf-8")
    old = run.root / f".report.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(build, final)
    shutil.rmtree(old, ignore_errors=True)
    return final / "index.html"
