"""The statistics of the results: pure functions of counts and scores."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from scipy import stats


def sign_test(wins: int, losses: int) -> float:
    """Two-sided p-value of an exact binomial sign test of wins against losses (ties left out,
    as the sign test does): the chance of a split at least this uneven if either side were
    equally likely to win. 1.0 when there is nothing to test."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins} wins and {losses} losses")
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def significance_mark(p: float) -> str:
    """ "**" below 0.01, "*" below 0.05, else nothing."""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""


@dataclasses.dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    n: int


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """The mean and its Student-t confidence interval (a zero-width interval for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return MeanCI(mean, mean, mean, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n))
    return MeanCI(mean, mean - half, mean + half, n)


@dataclasses.dataclass(frozen=True)
class PairedTest:
    mean_difference: float  # mean of a - b
    t: float
    p: float
    n: int


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """A paired t-test of two systems' scores on the same conversations (a[i] and b[i] rate
    the same situation). Identical differences give t = ±inf and p = 0 (or t = 0 and p = 1
    when they are all zero) rather than NaN."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equally long lists of >= 2 scores, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = math.fsum(diffs) / len(diffs)
    if all(d == diffs[0] for d in diffs):
        return PairedTest(
            mean, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0, len(diffs)
        )
    result = stats.ttest_rel(a, b)
    return PairedTest(mean, float(result.statistic), float(result.pvalue), len(diffs))
