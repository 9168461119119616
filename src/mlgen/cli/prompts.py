"""``mlgen prompts``: label sets, then validated scene prompts and synonyms from an LLM (or the template)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mlgen.config import PromptsConfig, read_config_file, stage_settings
from mlgen.labels import alias_setting, read_aliases, read_labels
from mlgen.lazy import LazyModule
from mlgen.pipeline.rundir import RunDir
from mlgen.prompts.composer import read_exclude_pairs, read_label_lines
from mlgen.prompts.instructions import load_instruction

workflow = LazyModule("mlgen.workflow")


def _opt(*names: str, help: str) -> Any:
    """An option (its MLGEN_PROMPTS_<KEY> variable is read by the stage's settings)."""
    return typer.Option(*names, help=help)


def prompts_command(
    run: Annotated[Path, typer.Option("--run", "--run-dir", envvar="MLGEN_RUN", help="Run directory.")] = Path(
        "mlgen-run"
    ),
    classes: Annotated[Path | None, typer.Option("--classes", help="Labels file: one label per line.")] = None,
    llm: Annotated[
        str | None,
        _opt("--llm", help="smollm2 (built in), template, a transformers id/folder, vllm:ID, or openai:MODEL."),
    ] = None,
    llm_base_url: Annotated[
        str | None,
        typer.Option("--llm-base-url", envvar="OPENAI_BASE_URL", help="openai: server URL, e.g. http://host:8000/v1."),
    ] = None,
    concurrency: Annotated[int | None, _opt("--concurrency", help="openai: requests in flight.")] = None,
    prompts_per_set: Annotated[int | None, _opt("--prompts-per-set", help="Scene prompts per label set.")] = None,
    synonyms: Annotated[int | None, _opt("--synonyms", help="Synonyms per label (S^3 uses them).")] = None,
    label_aliases: Annotated[
        Path | None,
        _opt(
            "--label-aliases", help="Your names of labels ('label: alias, alias' lines or YAML); prompts may use them."
        ),
    ] = None,
    synonym_source: Annotated[
        str | None,
        _opt("--synonym-source", help="both (WordNet first, the LLM fills up; default), lexicon (WordNet), or llm."),
    ] = None,
    prompt_style: Annotated[
        str | None, _opt("--prompt-style", help="mlgen (few-shot, default), paper (Diff-ZS-MLC's dialog), plain.")
    ] = None,
    prompt_template: Annotated[
        Path | None, _opt("--prompt-template", help="YAML instruction file (see prompts/templates/mlgen.yaml).")
    ] = None,
    set_size: Annotated[
        int | None, _opt("--set-size", help="Balanced label sets of 1..K labels instead of every pair.")
    ] = None,
    sets_per_label: Annotated[
        int | None, _opt("--sets-per-label", help="With --set-size: sets each label appears in.")
    ] = None,
    exclude_pairs: Annotated[
        Path | None, typer.Option("--exclude-pairs", help="File of label pairs never combined: 'a, b' a line.")
    ] = None,
    label_sets: Annotated[
        Path | None, typer.Option("--label-sets", help="File of explicit label sets: 'a, b, c' a line.")
    ] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", help="Requests per batch (in-process LLMs).")] = None,
    max_new_tokens: Annotated[int | None, _opt("--max-new-tokens", help="Tokens per answered sentence.")] = None,
    request_timeout: Annotated[float | None, _opt("--request-timeout", help="openai: seconds per request.")] = None,
    request_retries: Annotated[
        int | None, _opt("--request-retries", help="openai: retries of a failed request (with backoff).")
    ] = None,
    seed: Annotated[int | None, _opt("--seed", help="Sampling seed (each request's seed derives from it).")] = None,
    config: Annotated[Path | None, typer.Option("--config", envvar="MLGEN_CONFIG", help="YAML config file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo this stage if its settings changed.")] = False,
) -> None:
    """Compose label sets and have an LLM write validated scene prompts and synonyms."""
    labels = read_labels(classes) if classes else None
    aliases = read_aliases(label_aliases, labels or RunDir(run).classes()) if label_aliases else None
    flags = dict(
        llm=llm,
        llm_base_url=llm_base_url,
        concurrency=concurrency,
        prompts_per_set=prompts_per_set,
        synonyms_per_label=synonyms,
        label_aliases=alias_setting(aliases),
        synonym_source=synonym_source,
        prompt_style=prompt_style,
        prompt_template=str(prompt_template) if prompt_template else None,
        set_size=set_size,
        sets_per_label=sets_per_label,
        exclude_pairs=read_exclude_pairs(str(exclude_pairs)) if exclude_pairs else None,
        label_sets=read_label_lines(str(label_sets), "--label-sets") if label_sets else None,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        request_timeout=request_timeout,
        request_retries=request_retries,
        seed=seed,
    )
    settings = stage_settings(PromptsConfig, "prompts", read_config_file(config).get("prompts"), flags)
    load_instruction(settings.prompt_style, settings.prompt_template)  # a bad template fails before torch loads
    marker = workflow.make_prompts(RunDir(run), settings, labels, overwrite)
    if marker:
        counts = ", ".join(f"{k} {v}" for k, v in marker["counts"].items())
        typer.echo(f"prompts: done ({counts}) in {run / 'prompts'}")
        report = run / "prompts" / "report.json"
        if report.is_file():
            typer.echo(summary(json.loads(report.read_text(encoding="utf-8"))))


def summary(report: dict[str, Any]) -> str:
    """The report's main figures, the template-only baseline beside them."""
    ours, base = report["prompts"], report["template_only"]
    answers = report["answers"]
    rejected = ", ".join(f"{k} {v}" for k, v in answers["rejected"].items()) or "none"
    lines = [
        f"  {report['label_sets']['count']} label sets ({report['label_sets']['method']}), "
        f"{ours['prompts_per_set']['mean']} prompts a set; from the LLM {report['share_from_llm']:.0%}, "
        f"template {report['share_from_template']:.0%}",
        f"  answers valid {answers['accepted'] + answers['surplus']}/{answers['candidates']} "
        f"(share {answers['accepted_share']}); rejected: {rejected}",
        f"  requests {report['requests']['total']} ({report['requests']['answered_from_cache']} from the cache)",
        f"  {'':<22}{'these prompts':>14}{'template only':>15}",
    ]
    for key, title in (("distinct_2", "distinct 2-grams"), ("within_set_distance", "within-set distance")):
        a, b = ours[key], base[key]
        lines.append(f"  {title:<22}{'-' if a is None else a:>14}{'-' if b is None else b:>15}")
    lines.append(f"  {'label coverage':<22}{ours['label_coverage']:>14}{base['label_coverage']:>15}")
    lines.append(f"  report: {report.get('path', 'prompts/report.json')}")
    return "\n".join(lines)
