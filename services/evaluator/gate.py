"""The promotion gate: model k+1 replaces model k only if it is better with confidence, against
every model it must beat (the incumbent, and the seeds-only control).

The primary metric is by default the mean NLL of the reference responses (lower is better): it moves
clearly where the task score is a coin flip at tens of tasks (issue #19: t = 4.2 where the score's
interval straddled 0). NLL alone would promote a model that is likelier on references but answers
worse, so the task score is a non-inferiority check beside it: its difference's lower bound must be
above -score_margin. Gains are oriented so that positive is better for every metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from .intervals import Interval, length_controlled_difference, mean_interval

METRICS = ("nll", "score", "rouge_l")
LOWER_IS_BETTER = {"nll"}


@dataclass(frozen=True)
class TaskMetrics:
    score: float
    nll: float
    rouge_l: float
    category: str
    answer_words: float = 0.0


@dataclass(frozen=True)
class Comparison:
    against: str  # "incumbent", "control", ...
    against_mean: float  # the comparator's mean of the primary metric over the shared tasks
    gain: Interval  # the candidate's gain in the primary metric (positive: better)
    score_difference: Interval  # candidate minus comparator, task score
    passed: bool
    reason: str
    length_controlled_score_difference: Interval | None = None


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    metric: str
    candidate: Interval  # the candidate's mean of the primary metric over tasks
    candidate_score: Interval  # ... and of the task score
    comparisons: list[Comparison]
    margin: float
    score_margin: float
    reason: str


def _values(tasks: dict[str, TaskMetrics], metric: str) -> dict[str, float]:
    return {t: getattr(m, metric) for t, m in tasks.items()}


def _gain(candidate: dict[str, TaskMetrics], other: dict[str, TaskMetrics], metric: str) -> dict[str, float]:
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return {t: sign * (getattr(candidate[t], metric) - getattr(other[t], metric)) for t in set(candidate) & set(other)}


def decide(
    candidate: dict[str, TaskMetrics],
    against: dict[str, dict[str, TaskMetrics]],
    *,
    metric: str,
    margin: float,
    score_margin: float,
    method: str,
    confidence: float,
    resamples: int,
    seed: int,
    stratify: bool,
) -> PromotionDecision:
    """Per-task metrics in, decision out. Promote when, against every comparator, the lower bound of
    the gain's interval is above `margin` and (metric other than score) the lower bound of the score
    difference is above -score_margin. With no comparator, the candidate is promoted."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    strata = {t: m.category for t, m in candidate.items()} if stratify else None
    common = {"method": method, "confidence": confidence, "resamples": resamples, "seed": seed, "strata": strata}
    own = mean_interval(_values(candidate, metric), **common)
    own_score = mean_interval(_values(candidate, "score"), **common)
    comparisons = []
    for name, other in against.items():
        shared = set(candidate) & set(other)
        gain = mean_interval(_gain(candidate, other, metric), **common)
        score = mean_interval(_gain(candidate, other, "score"), **common)
        gain_ok = gain.low > margin
        score_ok = metric == "score" or score.low > -score_margin
        reasons = [f"{metric} gain lower bound {gain.low:+.4f} {'>' if gain_ok else '<='} margin {margin:+.4f}"]
        if metric != "score":
            sign = ">" if score_ok else "<="
            reasons.append(f"score difference lower bound {score.low:+.4f} {sign} -{score_margin:.4f}")
        against_mean = sum(getattr(other[t], metric) for t in sorted(shared)) / len(shared) if shared else 0.0
        length_controlled = length_controlled_difference(
            _values(other, "score"),
            _values(candidate, "score"),
            _values(other, "answer_words"),
            _values(candidate, "answer_words"),
            confidence=confidence,
        )
        passed = gain_ok and score_ok
        comparisons.append(Comparison(name, against_mean, gain, score, passed, "; ".join(reasons), length_controlled))
    if not comparisons:
        return PromotionDecision(True, metric, own, own_score, [], margin, score_margin, "no incumbent")
    promoted = all(c.passed for c in comparisons)
    reason = " | ".join(f"vs {c.against}: {c.reason}" for c in comparisons)
    return PromotionDecision(promoted, metric, own, own_score, comparisons, margin, score_margin, reason)
