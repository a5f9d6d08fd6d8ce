"""Bootstrap confidence intervals that resample tasks (the unit that generalizes), not instances."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float


def mean_interval(per_task: dict[str, float], resamples: int, confidence: float, seed: int = 0) -> Interval:
    """The mean over tasks and its percentile bootstrap interval (resamples and confidence come from
    evaluation.* in the config: no second set of defaults here)."""
    values = np.array(list(per_task.values()), dtype=np.float64)
    if values.size == 0:
        return Interval(0.0, 0.0, 0.0, confidence)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    return Interval(
        float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)), confidence
    )


def paired_difference(
    a: dict[str, float], b: dict[str, float], resamples: int, confidence: float, seed: int = 0
) -> Interval:
    """B minus A over the tasks both were scored on; tasks are resampled with their pair intact."""
    shared = sorted(set(a) & set(b))
    return mean_interval({t: b[t] - a[t] for t in shared}, resamples, confidence, seed)
