"""Confidence intervals over tasks (the unit that generalizes, never instances), and the smallest
effect each can see.

The gate's sample is small (tens of tasks), so the default is a paired t-interval: exact for a
normal mean and close at n >= 15 for bounded scores, where the percentile bootstrap is known to be
too narrow (about 9% at n = 17 on our dev scores: it ignores the t-quantile's heavier tails and
the n-1 in the variance). BCa (Efron 1987) corrects the bootstrap's bias and skew, and is offered
for skewed metrics; percentile stays for comparison. Every method can be stratified by category
(classification / generation): the estimate is the plain mean over tasks, the variance the sum of
the strata's, which is smaller whenever the categories differ in level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

Method = Literal["t", "bca", "percentile"]
METHODS: tuple[str, ...] = ("t", "bca", "percentile")
POWER = 0.8  # the power at which minimum detectable effects are quoted


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float
    method: str = "t"
    n: int = 0
    standard_error: float = 0.0
    # the smallest true effect this sample detects at 80% power with the interval's one-sided level
    minimum_detectable: float = 0.0


def _strata(keys: list[str], strata: dict[str, str] | None) -> list[np.ndarray]:
    """Index arrays, one per stratum; a stratum of one task cannot give a variance, so with any such
    stratum the sample is treated as one stratum."""
    if not strata:
        return [np.arange(len(keys))]
    names = sorted({strata.get(k, "") for k in keys})
    groups = [np.array([i for i, k in enumerate(keys) if strata.get(k, "") == n]) for n in names]
    return groups if all(len(g) >= 2 for g in groups) else [np.arange(len(keys))]


def _t_parts(values: np.ndarray, groups: list[np.ndarray]) -> tuple[float, float]:
    """Standard error of the mean and its degrees of freedom (Welch-Satterthwaite over strata)."""
    n = values.size
    parts = [(len(g) / n) ** 2 * values[g].var(ddof=1) / len(g) for g in groups]
    variance = sum(parts)
    if variance <= 0:
        return 0.0, float(max(n - 1, 1))
    dof = variance**2 / sum(p**2 / (len(g) - 1) for p, g in zip(parts, groups) if p > 0)
    return float(np.sqrt(variance)), float(dof)


def _t_interval(estimate: float, se: float, dof: float, confidence: float, n: int) -> Interval:
    q = stats.t.ppf(1 - (1 - confidence) / 2, dof)
    mde = (q + stats.t.ppf(POWER, dof)) * se
    return Interval(estimate, estimate - q * se, estimate + q * se, confidence, "t", n, se, float(mde))


def _bootstrap_means(values: np.ndarray, groups: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Means of stratified resamples (each stratum resampled within itself, its size kept)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for g in groups:
        picks = values[g][rng.integers(0, len(g), size=(resamples, len(g)))]
        total += picks.sum(axis=1)
    return total / values.size


def _jackknife_acceleration(values: np.ndarray) -> float:
    n = values.size
    leave_one_out = (values.sum() - values) / (n - 1)
    d = leave_one_out.mean() - leave_one_out
    denominator = 6.0 * (d**2).sum() ** 1.5
    return float((d**3).sum() / denominator) if denominator > 0 else 0.0


def mean_interval(
    values_by_task: dict[str, float],
    *,
    method: str,
    confidence: float,
    resamples: int,
    seed: int = 0,
    strata: dict[str, str] | None = None,
) -> Interval:
    """The mean over tasks and its two-sided `confidence` interval (method, confidence and resamples
    come from evaluation.* in the config: no second set of defaults here)."""
    if method not in METHODS:
        raise ValueError(f"interval method {method!r}: expected one of {', '.join(METHODS)}")
    keys = sorted(values_by_task)
    values = np.array([values_by_task[k] for k in keys], dtype=np.float64)
    n = values.size
    if n == 0:
        return Interval(0.0, 0.0, 0.0, confidence, method)
    estimate = float(values.mean())
    if n == 1:
        return Interval(estimate, estimate, estimate, confidence, method, 1)
    groups = _strata(keys, strata)
    tail = (1 - confidence) / 2
    if method == "t":
        return _t_interval(estimate, *_t_parts(values, groups), confidence, n)
    means = _bootstrap_means(values, groups, resamples, seed)
    se = float(means.std(ddof=1))
    mde = float((stats.norm.ppf(1 - tail) + stats.norm.ppf(POWER)) * se)
    if method == "percentile" or se == 0:
        low, high = np.quantile(means, [tail, 1 - tail])
        return Interval(estimate, float(low), float(high), confidence, method, n, se, mde)
    # BCa: the bias correction from where the estimate falls among the resamples, the acceleration
    # from the jackknife (Efron and Tibshirani 1993, 14.3)
    share_below = (means < estimate).mean() + 0.5 * (means == estimate).mean()
    z0 = stats.norm.ppf(np.clip(share_below, 1 / resamples, 1 - 1 / resamples))
    a = _jackknife_acceleration(values)
    bounds = []
    for z in (stats.norm.ppf(tail), stats.norm.ppf(1 - tail)):
        bounds.append(stats.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))))
    low, high = np.quantile(means, bounds)
    return Interval(estimate, float(low), float(high), confidence, method, n, se, mde)


def paired_difference(
    a: dict[str, float],
    b: dict[str, float],
    *,
    method: str,
    confidence: float,
    resamples: int,
    seed: int = 0,
    strata: dict[str, str] | None = None,
) -> Interval:
    """B minus A over the tasks both were scored on; tasks are resampled with their pair intact."""
    shared = sorted(set(a) & set(b))
    return mean_interval(
        {t: b[t] - a[t] for t in shared},
        method=method,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        strata=strata,
    )


def length_controlled_difference(
    a: dict[str, float],
    b: dict[str, float],
    a_length: dict[str, float],
    b_length: dict[str, float],
    *,
    confidence: float,
) -> Interval:
    """B minus A at equal answer length: the intercept of the per-task differences regressed on the
    log ratio of the two answers' lengths (the idea of AlpacaEval's length-controlled win rate, on
    reference scores), with its t-interval. A gain that is only longer (or shorter) answers goes to
    the slope, not the intercept."""
    shared = sorted(set(a) & set(b) & set(a_length) & set(b_length))
    d = np.array([b[t] - a[t] for t in shared], dtype=np.float64)
    x = np.array([np.log1p(b_length[t]) - np.log1p(a_length[t]) for t in shared], dtype=np.float64)
    n = d.size
    if n < 3 or np.ptp(x) == 0:  # no spread in length: the plain paired mean is already length-controlled
        return mean_interval(dict(zip(shared, d)), method="t", confidence=confidence, resamples=0)
    design = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(design, d, rcond=None)
    residual = d - design @ coef
    dof = n - 2
    sigma2 = float(residual @ residual) / dof
    se = float(np.sqrt(sigma2 * np.linalg.inv(design.T @ design)[0, 0]))
    return _t_interval(float(coef[0]), se, dof, confidence, n)
