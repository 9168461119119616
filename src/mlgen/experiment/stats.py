"""Paired statistics over seeds: every arm is compared with its reference arm on the same seeds.

The difference of an arm to its reference is taken seed by seed (the same test draw, seen data and generation
where they share it), and its mean gets a two-sided Student-t interval over the seeds and a paired t-test p.
A table makes several comparisons at once, so its verdicts are Holm-corrected (family-wise error 5%): a
difference "holds" only when its Holm-adjusted p is below 0.05; the raw p stands beside it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df)); beyond the
# table a Cornish-Fisher expansion of the normal quantile (within 3e-4 of scipy at df 21, less above).
T975 = {
    1: 12.706205,
    2: 4.302653,
    3: 3.182446,
    4: 2.776445,
    5: 2.570582,
    6: 2.446912,
    7: 2.364624,
    8: 2.306004,
    9: 2.262157,
    10: 2.228139,
    11: 2.200985,
    12: 2.178813,
    13: 2.160369,
    14: 2.144787,
    15: 2.131450,
    16: 2.119905,
    17: 2.109816,
    18: 2.100922,
    19: 2.093024,
    20: 2.085963,
    25: 2.059539,
    30: 2.042272,
}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided interval)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def mean_interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (one value: no interval, low = high = the value)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, mean, mean, 1)
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(arm: dict[int, float], reference: dict[int, float]) -> Interval:
    """The mean of ``arm - reference`` over the seeds both have, with its 95% t-interval."""
    seeds = sorted(set(arm) & set(reference))
    return mean_interval([arm[s] - reference[s] for s in seeds])


def paired_p(arm: dict[int, float], reference: dict[int, float]) -> float:
    """The two-sided paired t-test p of ``arm - reference`` over the seeds both have (NaN below 2 seeds; 0 when
    every seed differs by the same non-zero amount, 1 when none differs)."""
    diffs = [arm[s] - reference[s] for s in sorted(set(arm) & set(reference))]
    if len(diffs) < 2:
        return math.nan
    spread = statistics.stdev(diffs)
    if spread == 0:
        return 1.0 if statistics.fmean(diffs) == 0 else 0.0
    from scipy.stats import t

    statistic = statistics.fmean(diffs) / (spread / math.sqrt(len(diffs)))
    return float(2 * t.sf(abs(statistic), len(diffs) - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def holm_verdict(interval: Interval, adjusted_p: float, reference: str = "mlgen", alpha: float = 0.05) -> str:
    """ "holds (above/below REFERENCE)" when the Holm-adjusted p is below ``alpha``, else "not shown"."""
    if interval.n < 2 or math.isnan(adjusted_p):
        return "too few seeds"
    if adjusted_p >= alpha:
        return "not shown"
    return f"holds (above {reference})" if interval.mean > 0 else f"holds (below {reference})"


def verdict(interval: Interval) -> str:
    """ "holds" when the interval excludes zero (better or worse than mlgen), else "not shown"."""
    if interval.n < 2:
        return "too few seeds"
    if not interval.excludes_zero:
        return "not shown"
    return "holds (above mlgen)" if interval.low > 0 else "holds (below mlgen)"


def gap_closed(mlgen: float, zero_shot: float, oracle: float) -> float:
    """(mlgen - zero-shot) / (oracle - zero-shot): the share of the way from the teacher to the ceiling; NaN
    (no gap to close) when the oracle is not above the teacher, as in the classic world whose CLIP is perfect."""
    span = oracle - zero_shot
    return math.nan if span <= 1e-12 else (mlgen - zero_shot) / span
