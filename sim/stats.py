"""Summaries over seeds: mean and spread, and the paired difference of two methods with its 95% interval.

Two methods run with the same seed share the data split, the fleet, the sampled clients and the
batches, so their accuracies are paired: the interval of the per-seed differences (Student's t with
``n - 1`` degrees of freedom) is much narrower than comparing the two means would be.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
        18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
        26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}  # fmt: skip


MIN_SEEDS_FOR_VERDICT = 3


def t95(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    return _T95.get(df, 1.96)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("no values to summarise")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Paired:
    """``a - b`` over paired seeds: mean difference and the half width of its 95% interval."""

    n: int
    mean: float
    half_width: float  # nan with a single seed: no interval

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def verdict(self, better: str = "higher", worse: str = "lower") -> str:
        """In words: ``higher`` / ``lower`` when the interval excludes 0, else ``within noise``.

        Two seeds give no verdict: with one degree of freedom the interval rests on a single
        difference of differences, and test accuracies move in steps of one test example, so two
        seeds often differ by exactly the same count and the interval collapses to a point (seen in
        the claims grid: +9 examples on both seeds read as "holds").
        """
        if self.n < 2 or math.isnan(self.half_width):
            return "one seed: no verdict"
        if self.n < MIN_SEEDS_FOR_VERDICT:
            return f"{self.n} seeds: no verdict ({MIN_SEEDS_FOR_VERDICT} needed)"
        if self.low > 0:
            return better
        if self.high < 0:
            return worse
        return "within noise"


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """The paired difference ``a - b`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    diffs = [a[s] - b[s] for s in seeds]
    mean, sd = mean_std(diffs)
    half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return Paired(len(diffs), mean, half)
