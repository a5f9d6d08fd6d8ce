"""The promotion gate: model k+1 replaces model k only if it is better with confidence."""

from __future__ import annotations

from dataclasses import dataclass

from .bootstrap import Interval, mean_interval, paired_difference


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    metric: str
    candidate: Interval  # the candidate's mean over tasks, with its interval
    incumbent: float | None
    difference: Interval | None  # candidate minus incumbent; None without an incumbent
    margin: float
    reason: str


def decide(
    candidate: dict[str, float],
    incumbent: dict[str, float] | None,
    *,
    metric: str,
    margin: float,
    confidence: float,
    resamples: int,
    seed: int,
) -> PromotionDecision:
    """Per-task scores in, decision out: promote when the lower bound of the bootstrap interval of
    (candidate - incumbent) is above margin. With no incumbent, the candidate is promoted."""
    own = mean_interval(candidate, resamples, confidence, seed)
    if incumbent is None:
        return PromotionDecision(True, metric, own, None, None, margin, "no incumbent")
    interval = paired_difference(incumbent, candidate, resamples, confidence, seed)
    incumbent_mean = sum(incumbent.values()) / len(incumbent) if incumbent else 0.0
    promoted = interval.low > margin
    reason = (
        f"lower bound {interval.low:+.4f} > margin {margin:+.4f}"
        if promoted
        else f"lower bound {interval.low:+.4f} <= margin {margin:+.4f}"
    )
    return PromotionDecision(promoted, metric, own, incumbent_mean, interval, margin, reason)
