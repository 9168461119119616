"""The experiment's outputs: ``results.csv`` (one row per seed, arm and setting, failed cells included),
``summary.json`` (per arm: mean and 95% interval, the paired difference to mlgen with its interval and verdict,
the failed seeds), ``table.md`` and ``plot.png`` (each arm's mean with its interval)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from mlgen.experiment.arms import REFERENCE
from mlgen.experiment.stats import gap_closed, mean_interval, paired_interval, verdict
from mlgen.paths import write_atomic, write_json_atomic, write_text_atomic

SETTINGS = ("zsl", "gzsl")
FIELDS = ("seed", "arm", "setting", "mAP", "F1@3", "images", "steps", "status", "error")


def result_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        for setting in SETTINGS:
            ok = cell["status"] == "ok"
            figures = cell.get(setting, {}) if ok else {}
            rows.append(
                {
                    "seed": cell["seed"],
                    "arm": cell["arm"],
                    "setting": setting,
                    "mAP": f"{figures['mAP']:.4f}" if ok else "",
                    "F1@3": f"{figures['f1@3']:.4f}" if ok else "",
                    "images": cell.get("images", ""),
                    "steps": cell.get("steps", ""),
                    "status": cell["status"],
                    "error": cell.get("error", ""),
                }
            )
    return rows


def _by_seed(cells: list[dict[str, Any]], arm: str, setting: str, metric: str = "mAP") -> dict[int, float]:
    return {c["seed"]: c[setting][metric] for c in cells if c["arm"] == arm and c["status"] == "ok"}


def summarise(cells: list[dict[str, Any]], arms: list[str], seeds: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"seeds": seeds, "reference": REFERENCE, "interval": "95% Student t over seeds"}
    for setting in SETTINGS:
        reference = _by_seed(cells, REFERENCE, setting)
        block = {}
        for arm in arms:
            values = _by_seed(cells, arm, setting)
            entry: dict[str, Any] = {
                "mAP": _interval(mean_interval(list(values.values()))),
                "F1@3": _interval(mean_interval(list(_by_seed(cells, arm, setting, "f1@3").values()))),
                "seeds_ok": len(values),
                "failed_seeds": sorted(c["seed"] for c in cells if c["arm"] == arm and c["status"] != "ok"),
            }
            if arm != REFERENCE and reference:
                diff = paired_interval(values, reference)
                entry["minus_mlgen"] = {**_interval(diff), "verdict": verdict(diff)}
            block[arm] = entry
        block["gap_closed"] = _gap(cells, setting)
        summary[setting] = block
    return summary


def _interval(interval) -> dict[str, float | int | None]:
    clean = [None if math.isnan(v) else round(v, 4) for v in (interval.mean, interval.low, interval.high)]
    return {"mean": clean[0], "low": clean[1], "high": clean[2], "n": interval.n}


def _gap(cells: list[dict[str, Any]], setting: str) -> dict[str, Any] | None:
    """(mlgen - zero-shot) / (oracle - zero-shot) on the means over the seeds all three have, and per seed."""
    parts = [_by_seed(cells, arm, setting) for arm in (REFERENCE, "zero-shot", "oracle")]
    seeds = sorted(set(parts[0]) & set(parts[1]) & set(parts[2]))
    if not seeds:
        return None
    means = [sum(p[s] for s in seeds) / len(seeds) for p in parts]
    value = gap_closed(*means)
    per_seed = {s: gap_closed(parts[0][s], parts[1][s], parts[2][s]) for s in seeds}
    return {
        "value": None if math.isnan(value) else round(value, 4),
        "per_seed": {str(s): None if math.isnan(v) else round(v, 4) for s, v in per_seed.items()},
        "seeds": len(seeds),
    }


def table(summary: dict[str, Any], arms: list[str]) -> str:
    """Markdown: per arm and setting the mean mAP [95% CI], the paired difference to mlgen and its verdict."""
    lines = [
        "| arm | ZSL mAP [95% CI] | ZSL - mlgen [95% CI] | verdict | GZSL mAP [95% CI] | GZSL - mlgen [95% CI] "
        "| verdict | seeds ok | failed seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        cols = []
        for setting in SETTINGS:
            entry = summary[setting][arm]
            cols.append(_ci(entry["mAP"]))
            diff = entry.get("minus_mlgen")
            cols += [_ci(diff, signed=True), diff["verdict"]] if diff else ["(reference)", ""]
        entry = summary["zsl"][arm]
        failed = ", ".join(map(str, entry["failed_seeds"])) or "-"
        lines.append(f"| {arm} | " + " | ".join(cols) + f" | {entry['seeds_ok']}/{summary['seeds']} | {failed} |")
    for setting in SETTINGS:
        gap = summary[setting]["gap_closed"]
        text = (
            "n/a (needs mlgen, zero-shot and an oracle above zero-shot)"
            if gap is None or gap["value"] is None
            else f"{gap['value']:.3f}"
        )
        lines.append(f"\nGap closed {setting.upper()} = (mlgen - zero-shot) / (oracle - zero-shot) = {text}")
    return "\n".join(lines) + "\n"


def _ci(entry: dict[str, Any] | None, signed: bool = False) -> str:
    if not entry or entry["mean"] is None:
        return "failed"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if entry["n"] < 2:
        return fmt.format(entry["mean"]) + " [n=1]"
    return f"{fmt.format(entry['mean'])} [{fmt.format(entry['low'])}, {fmt.format(entry['high'])}]"


def plot(summary: dict[str, Any], arms: list[str], out: Path) -> None:
    """Each arm's mean mAP with its 95% interval, ZSL and GZSL side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(arms) + 1.5), sharey=True)
    for ax, setting in zip(axes, SETTINGS, strict=True):
        for y, arm in enumerate(arms):
            entry = summary[setting][arm]["mAP"]
            if entry["mean"] is None:
                continue
            low, high = entry["low"], entry["high"]
            ax.errorbar(entry["mean"], y, xerr=[[entry["mean"] - low], [high - entry["mean"]]], fmt="o", capsize=3)
        ax.set_title(f"{setting.upper()} mAP (mean, 95% CI over seeds)")
        ax.set_yticks(range(len(arms)), arms)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def write_report(
    root: Path, cells: list[dict[str, Any]], arms: list[str], seeds: int, audits: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """results.csv, summary.json, table.md (with the filter audit's table when seeds were audited), plot.png."""
    from mlgen.experiment.audit import audit_summary, audit_table

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(result_rows(cells))
    write_text_atomic(root / "results.csv", buffer.getvalue())
    summary = summarise(cells, arms, seeds)
    text = table(summary, arms)
    if audits:
        summary["filter_audit"] = audit_summary(audits)
        text += audit_table(summary["filter_audit"])
    write_json_atomic(root / "summary.json", summary)
    write_text_atomic(root / "table.md", text)
    plot(summary, arms, root / "plot.png")
    return summary
