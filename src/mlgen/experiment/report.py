"""The experiment's outputs: ``results.csv`` (one row per seed, arm and setting, failed cells included, with what
each cell trained on), ``summary.json`` (per arm: mean and 95% interval, the paired difference to its reference
arm with its interval, raw and Holm-adjusted p and verdict, the failed seeds; further comparisons), ``table.md``
and ``plot.png`` (each arm's mean with its interval)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from mlgen.experiment.arms import BY_NAME, EXTRA_COMPARISONS, REFERENCE
from mlgen.experiment.runs import PROMPTS_NOTE
from mlgen.experiment.stats import gap_closed, holm, holm_verdict, mean_interval, paired_interval, paired_p
from mlgen.paths import write_atomic, write_json_atomic, write_text_atomic

SETTINGS = ("zsl", "gzsl")
FIELDS = (
    "seed",
    "arm",
    "setting",
    "mAP",
    "F1@3",
    "images",
    "steps",
    "real_steps",
    "synthetic_steps",
    "images_per_label",
    "selected_epoch",
    "kept_share",
    "gated",
    "status",
    "error",
)


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
                    "real_steps": cell.get("real_steps", ""),
                    "synthetic_steps": cell.get("synthetic_steps", ""),
                    "images_per_label": "|".join(f"{k}:{v}" for k, v in (cell.get("images_per_label") or {}).items()),
                    "selected_epoch": "" if cell.get("selected_epoch") is None else cell["selected_epoch"],
                    "kept_share": "" if cell.get("kept_share") is None else f"{cell['kept_share']:.4f}",
                    "gated": "" if cell.get("gated") is None else ("|".join(cell["gated"]) or "none"),
                    "status": cell["status"],
                    "error": cell.get("error", ""),
                }
            )
    return rows


def _by_seed(cells: list[dict[str, Any]], arm: str, setting: str, metric: str = "mAP") -> dict[int, float]:
    return {c["seed"]: c[setting][metric] for c in cells if c["arm"] == arm and c["status"] == "ok"}


def reference_of(arm: str) -> str:
    return BY_NAME[arm].reference if arm in BY_NAME else REFERENCE


def comparisons(arms: list[str]) -> list[tuple[str, str]]:
    """(arm, reference) pairs of the table: every arm against its reference, then the extra comparisons (both
    arms run)."""
    pairs = [(arm, reference_of(arm)) for arm in arms if arm != reference_of(arm)]
    pairs += [(a, b) for a, b in EXTRA_COMPARISONS if a in arms and b in arms and (a, b) not in pairs]
    return pairs


def summarise(cells: list[dict[str, Any]], arms: list[str], seeds: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "seeds": len(seeds),
        "seed_list": list(seeds),
        "reference": REFERENCE,
        "interval": "95% Student t over seeds, paired",
        "verdicts": "paired t-test, Holm-corrected over each setting's comparisons (family-wise 5%)",
        "prompts": PROMPTS_NOTE,
    }
    for setting in SETTINGS:
        block: dict[str, Any] = {}
        for arm in arms:
            values = _by_seed(cells, arm, setting)
            block[arm] = {
                "mAP": _interval(mean_interval(list(values.values()))),
                "F1@3": _interval(mean_interval(list(_by_seed(cells, arm, setting, "f1@3").values()))),
                "seeds_ok": len(values),
                "failed_seeds": sorted(c["seed"] for c in cells if c["arm"] == arm and c["status"] != "ok"),
                **_filter_share(cells, arm),
            }
        block["comparisons"] = _compare(cells, arms, setting)
        for entry in block["comparisons"]:
            if entry["reference"] == reference_of(entry["arm"]):
                block[entry["arm"]]["minus_reference"] = entry
        block["gap_closed"] = _gap(cells, setting, "oracle")
        block["gap_closed_probe"] = _gap(cells, setting, "probe")
        summary[setting] = block
    return summary


def _filter_share(cells: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    """The arm's filter over its seeds: mean kept share (kept / generated) and, per label it did not filter on
    (gated), on how many seeds; None for an arm without a filter."""
    mine = [c for c in cells if c["arm"] == arm and c["status"] == "ok" and c.get("kept_share") is not None]
    if not mine:
        return {"kept_share": None, "gated": None}
    gated: dict[str, int] = {}
    for cell in mine:
        for label in cell.get("gated") or []:
            gated[label] = gated.get(label, 0) + 1
    return {"kept_share": round(sum(c["kept_share"] for c in mine) / len(mine), 4), "gated": gated}


def _compare(cells: list[dict[str, Any]], arms: list[str], setting: str) -> list[dict[str, Any]]:
    """Each comparison's paired difference, raw p and Holm-adjusted p (over this setting's comparisons)."""
    out = []
    for arm, reference in comparisons(arms):
        values, ref = _by_seed(cells, arm, setting), _by_seed(cells, reference, setting)
        entry: dict[str, Any] = {"arm": arm, "reference": reference, "paired_seeds": len(set(values) & set(ref))}
        if reference not in arms:
            entry["note"] = f"reference {reference} not run"
        elif not ref:
            entry["note"] = f"reference {reference} failed on every seed"
        diff = paired_interval(values, ref)
        entry.update(_interval(diff), p=_round(paired_p(values, ref)), diff=diff)
        out.append(entry)
    adjusted = holm([math.nan if e["p"] is None else e["p"] for e in out])
    for entry, p in zip(out, adjusted, strict=True):
        entry["p_holm"] = _round(p)
        entry["verdict"] = entry.get("note") or holm_verdict(entry.pop("diff"), p, entry["reference"])
        entry.pop("diff", None)
    return out


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def _interval(interval) -> dict[str, float | int | None]:
    clean = [None if math.isnan(v) else round(v, 4) for v in (interval.mean, interval.low, interval.high)]
    return {"mean": clean[0], "low": clean[1], "high": clean[2], "n": interval.n}


CEILINGS = ("oracle", "probe")  # the gap closed is reported against each that ran
BOOTSTRAP = 2000  # resamples of the seeds for the gap's interval


def _gap(cells: list[dict[str, Any]], setting: str, ceiling: str = "oracle") -> dict[str, Any] | None:
    """(mlgen - zero-shot) / (ceiling - zero-shot) on the means over the seeds all three have, per seed, and a 95%
    percentile bootstrap interval over seeds (the seeds resampled with replacement, the ratio of means redone;
    resamples with no gap to close are left out and counted)."""
    import numpy as np

    parts = [_by_seed(cells, arm, setting) for arm in (REFERENCE, "zero-shot", ceiling)]
    seeds = sorted(set(parts[0]) & set(parts[1]) & set(parts[2]))
    if not seeds:
        return None
    table_ = np.array([[p[s] for p in parts] for s in seeds])  # [seeds, (mlgen, zero-shot, ceiling)]
    value = gap_closed(*table_.mean(0))
    per_seed = {s: gap_closed(*row) for s, row in zip(seeds, table_, strict=True)}
    draws = np.random.default_rng(0).integers(0, len(seeds), size=(BOOTSTRAP, len(seeds)))
    means = table_[draws].mean(1)  # [BOOTSTRAP, 3]
    span = means[:, 2] - means[:, 1]
    ok = span > 1e-12
    ratios = (means[ok, 0] - means[ok, 1]) / span[ok]
    low, high = (None, None) if len(seeds) < 2 or not ok.any() else np.percentile(ratios, [2.5, 97.5])
    return {
        "ceiling": ceiling,
        "value": None if math.isnan(value) else round(value, 4),
        "low": None if low is None else round(float(low), 4),
        "high": None if high is None else round(float(high), 4),
        "interval": f"95% percentile bootstrap over seeds ({BOOTSTRAP} resamples)",
        "resamples_without_a_gap": int((~ok).sum()),
        "per_seed": {str(s): None if math.isnan(v) else round(v, 4) for s, v in per_seed.items()},
        "seeds": len(seeds),
    }


def table(summary: dict[str, Any], arms: list[str]) -> str:
    """Markdown: per arm and setting the mean mAP [95% CI] and the paired difference to its reference arm with
    its raw and Holm-adjusted p and verdict; then the further comparisons and the gap closed."""
    lines = [
        "| arm | ZSL mAP [95% CI] | GZSL mAP [95% CI] | compared with | ZSL diff [95% CI] | p (Holm) | verdict "
        "| GZSL diff [95% CI] | p (Holm) | verdict | kept share | gated (seeds) | paired seeds | failed seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        zsl, gzsl = summary["zsl"][arm], summary["gzsl"][arm]
        cols = [_ci(zsl["mAP"]), _ci(gzsl["mAP"])]
        diffs = [summary[s][arm].get("minus_reference") for s in SETTINGS]
        cols.append(diffs[0]["reference"] if diffs[0] else "(reference)")
        for diff in diffs:
            cols += [_ci(diff, signed=True), _p(diff), diff["verdict"]] if diff else ["", "", ""]
        cols += _filter_cols(zsl)
        paired = str(diffs[0]["paired_seeds"]) if diffs[0] else f"{zsl['seeds_ok']}"
        failed = ", ".join(map(str, zsl["failed_seeds"])) or "-"
        lines.append(f"| {arm} | " + " | ".join(cols) + f" | {paired} | {failed} |")
    extra = [
        (e, g)
        for e, g in zip(summary["zsl"]["comparisons"], summary["gzsl"]["comparisons"], strict=True)
        if e["reference"] != reference_of(e["arm"])
    ]
    if extra:
        lines += [
            "\n| comparison | ZSL diff [95% CI] | p (Holm) | verdict | GZSL diff [95% CI] | p (Holm) | verdict "
            "| paired seeds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e, g in extra:
            cols = [_ci(e, signed=True), _p(e), e["verdict"], _ci(g, signed=True), _p(g), g["verdict"]]
            lines.append(f"| {e['arm']} - {e['reference']} | " + " | ".join(cols) + f" | {e['paired_seeds']} |")
    lines.append(f"\nVerdicts: {summary['verdicts']}; p is the raw paired t-test p, Holm's adjusted p in brackets.")
    for setting in SETTINGS:
        for key, ceiling in (("gap_closed", "oracle"), ("gap_closed_probe", "probe")):
            gap = summary[setting].get(key)
            if gap is None and ceiling == "probe":
                continue
            if gap is None or gap["value"] is None:
                text = f"n/a (needs mlgen, zero-shot and a {ceiling} above zero-shot)"
            elif gap["low"] is None:
                text = f"{gap['value']:.3f} [n={gap['seeds']}]"
            else:
                text = f"{gap['value']:.3f} [{gap['low']:.3f}, {gap['high']:.3f}] (bootstrap over {gap['seeds']} seeds)"
            lines.append(f"\nGap closed {setting.upper()} = (mlgen - zero-shot) / ({ceiling} - zero-shot) = {text}")
    return "\n".join(lines) + "\n"


def _filter_cols(entry: dict[str, Any]) -> list[str]:
    """kept share and gated labels of an arm with a filter; '-' for an arm without one."""
    if entry.get("kept_share") is None:
        return ["-", "-"]
    gated = ", ".join(f"{label} ({n})" for label, n in sorted(entry["gated"].items())) or "none"
    return [f"{entry['kept_share']:.3f}", gated]


def _p(entry: dict[str, Any]) -> str:
    if entry.get("p") is None:
        return "-"
    return f"{entry['p']:.3g} ({entry['p_holm']:.3g})"


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
    root: Path,
    cells: list[dict[str, Any]],
    arms: list[str],
    seeds: list[int],
    audits: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """results.csv, summary.json, table.md (with the filter audit's table when seeds were audited), plot.png."""
    from mlgen.experiment.audit import audit_summary, audit_table

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(result_rows(cells))
    write_text_atomic(root / "results.csv", buffer.getvalue())
    summary = summarise(cells, arms, seeds)
    text = f"Seeds {_seed_range(seeds)}. Prompts: {PROMPTS_NOTE}.\n\n" + table(summary, arms)
    if audits:
        summary["filter_audit"] = audit_summary(audits)
        text += audit_table(summary["filter_audit"])
    write_json_atomic(root / "summary.json", summary)
    write_text_atomic(root / "table.md", text)
    plot(summary, arms, root / "plot.png")
    return summary


POOLED_ARMS = ("zero-shot", "mlgen", "no-filter", "no-filter-matched", "oracle", "probe")


def _seed_range(seeds: list[int]) -> str:
    seeds = sorted(seeds)
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0])
    return ", ".join(map(str, seeds))


def seed_units(cells: list[dict[str, Any]], splits: int) -> list[dict[str, Any]]:
    """One cell per (seed, arm): its figures averaged over the seed's splits. A seed's splits share its scenes
    (its test draws overlap between splits), so they are not independent observations: the seed is the unit, and
    an arm's seed counts only when every split of it finished (else the unit is failed)."""
    out = []
    for seed, arm in sorted({(c["seed"], c["arm"]) for c in cells}):
        mine = [c for c in cells if c["seed"] == seed and c["arm"] == arm and c["status"] == "ok"]
        if len(mine) < splits:
            out.append({"seed": seed, "arm": arm, "status": "failed", "error": "a split of this seed failed"})
            continue
        unit: dict[str, Any] = {"seed": seed, "arm": arm, "status": "ok"}
        if all(c.get("kept_share") is not None for c in mine):  # the filter's share over the seed's splits
            unit["kept_share"] = sum(c["kept_share"] for c in mine) / splits
            unit["gated"] = sorted({f"{label} (split {c['split']})" for c in mine for label in c.get("gated") or []})
        for setting in SETTINGS:
            unit[setting] = {k: sum(c[setting][k] for c in mine) / splits for k in ("mAP", "f1@3")}
        out.append(unit)
    return out


def write_pooled_report(
    root: Path, cells: list[dict[str, Any]], arms, splits: list[list[str]], seeds: list[int]
) -> dict:
    """``splits.md`` and ``splits.json``: each split's means, and the paired differences pooled over splits with
    the seed as the unit (each seed's figures averaged over its splits first: df = seeds - 1)."""
    names = [arm.name for arm in arms]
    pooled = summarise(seed_units(cells, len(splits)), names, seeds)
    pooled["unit"] = "seed: each seed's figures averaged over its splits first (df = seeds - 1)"
    shown = [arm for arm in names if arm in POOLED_ARMS] or names
    lines = [
        f"# {len(splits)} unseen-label splits x {len(seeds)} seeds ({_seed_range(seeds)})",
        "",
        "| split | unseen | " + " | ".join(f"{arm} ZSL" for arm in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    for number, unseen in enumerate(splits):
        split_cells = [c for c in cells if c["split"] == number]
        means = []
        for arm in shown:
            values = list(_by_seed(split_cells, arm, "zsl").values())
            means.append(_ci(_interval(mean_interval(values))))
        lines.append(f"| {number} | {', '.join(unseen)} | " + " | ".join(means) + " |")
    lines += ["", f"Pooled over splits, the seed as the unit (n = {len(seeds)} seeds, df = {len(seeds) - 1}):", ""]
    lines.append(table(pooled, names))
    write_text_atomic(root / "splits.md", "\n".join(lines))
    write_json_atomic(root / "splits.json", {"splits": splits, "n": len(seeds), "seed_list": seeds, "pooled": pooled})
    return pooled
