"""``mlgen run --config examples/paper-coco.yaml --data coco-zsl:ROOT``: the official recipe on a benchmark.

What ``--data`` adds to an ordinary ``mlgen run`` (no torch here: the command line imports this for checks and
``--dry-run``):

- the run's labels are the benchmark's unseen ones (MS-COCO's 17, NUS-WIDE's 81; shipped with mlgen);
- the classifier also trains on the real seen-train images (``seen_data``) and picks its epochs on the test
  splits too when the config says ``select: official`` or ``both`` (``test_data``);
- after training, the classifier is scored on the ZSL and GZSL test splits, and both selections are printed
  side by side, so the optimism of choosing on the test split is a number.

The config's ``rounds:`` section holds the quota (kept images per label) and the most rounds.
"""

from __future__ import annotations

from typing import Any

from mlgen.classifiers.benchmarks import Spec, parse_spec, split_labels
from mlgen.errors import MlgenError

ROUNDS_KEYS = ("quota", "max_rounds")
DEFAULT_MAX_ROUNDS = 5
SHOWN = ("mAP", "f1@3", "f1@5")


def benchmark_spec(data: str) -> Spec:
    """The whole benchmark ``--data`` names (no split: the recipe reads seen-train and both test splits)."""
    spec = parse_spec(data)
    if spec is None:
        raise MlgenError(f"--data {data}: mlgen run reproduces a benchmark: coco-zsl:ROOT or nus-zsl:ROOT")
    if spec.split is not None:
        raise MlgenError(f"--data {data}: name the benchmark's folder without a split (the recipe reads them all)")
    return spec


def benchmark_setup(
    spec: Spec, config: dict[str, Any], classes: list[str] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """(the run's labels: the benchmark's unseen ones, the classifier settings the benchmark implies, which the
    config file's ``classifier:`` section may still override). ``classes``: the config's own labels, if any,
    which must be those unseen ones."""
    unseen = split_labels(spec.benchmark)["unseen-test"]
    if classes is not None and sorted(classes) != sorted(unseen):
        other = (sorted(set(classes) ^ set(unseen)) or classes)[0]
        raise MlgenError(
            f"the config's classes are not the {len(unseen)} unseen labels of {spec.benchmark} (e.g. '{other}'): "
            "leave classes: out, --data sets them"
        )
    return unseen, {"seen_data": f"{spec}:seen-train", "test_data": str(spec)}


def rounds_settings(config: dict[str, Any], quota: int | None, max_rounds: int | None) -> tuple[int | None, int]:
    """(quota, most rounds): the flags, else the config file's ``rounds:`` section, else no quota / 5 rounds."""
    section = config.get("rounds") or {}
    if not isinstance(section, dict):
        raise MlgenError("the config's rounds: section must be a mapping (quota:, max_rounds:)")
    unknown = sorted(set(section) - set(ROUNDS_KEYS))
    if unknown:
        raise MlgenError(f"unknown setting '{unknown[0]}' for rounds (use {', '.join(ROUNDS_KEYS)})")
    for key in ROUNDS_KEYS:
        value = section.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MlgenError(f"setting '{key}' of rounds must be a positive whole number, got {value!r}")
    quota = quota if quota is not None else section.get("quota")
    max_rounds = max_rounds if max_rounds is not None else section.get("max_rounds") or DEFAULT_MAX_ROUNDS
    return quota, max_rounds


def _row(title: str, values: dict[str, Any]) -> str:
    shown = "  ".join(f"{k} {values[k]:.3f}" for k in SHOWN if k in values)
    return f"{title:<58} {shown}  ({values['images']} images)"


def selection_lines(metrics: dict[str, Any]) -> list[str]:
    """The benchmark figures of both selections and their difference (printed after training / evaluation):
    the weights chosen on validation (or the final ones), then each setting's checkpoint chosen on the TEST split
    as the official code does, labelled as such, then official minus validation (the optimism)."""
    official = metrics.get("official")
    if not official or "zsl" not in metrics:
        return []
    lines = []
    for name in ("zsl", "gzsl"):
        lines.append(_row(f"{name.upper()}, {official['label']} (epoch {official['epochs'][name]})", official[name]))
    for name in ("zsl", "gzsl"):
        ours, test = metrics[name], official[name]
        diff = "  ".join(f"{k} {test[k] - ours[k]:+.3f}" for k in SHOWN if k in ours and k in test)
        lines.append(f"{name.upper()} optimism of test selection (official - validation):{'':<6} {diff}")
    return lines
