"""Paired statistics over seeds: every arm is compared with ``mlgen`` on the same seeds.

The difference of an arm to ``mlgen`` is taken seed by seed (same test set, same seen data, same generation
where they share it), and its mean gets a two-sided Student-t interval over the seeds. A verdict says
"holds" only when the interval excludes zero.
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
