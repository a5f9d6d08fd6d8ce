"""The promotion gate: model k+1 replaces model k only if it is better with confidence."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .bootstrap import paired_difference


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    metric: str
    candidate: float
    incumbent: float | None
    difference: float
    low: float
    high: float
    confidence: float
    margin: float
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    candidate: dict[str, float],
    incumbent: dict[str, float] | None,
    *,
    metric: str,
    margin: float,
    confidence: float,
    resamples: int = 2000,
    seed: int = 0,
) -> PromotionDecision:
    """Per-task scores in, decision out: promote when the lower bound of the bootstrap interval of
    (candidate - incumbent) is above margin. With no incumbent, the candidate is promoted."""
    mean = sum(candidate.values()) / len(candidate) if candidate else 0.0
    if incumbent is None:
        return PromotionDecision(True, metric, mean, None, mean, mean, mean, confidence, margin, "no incumbent")
    interval = paired_difference(incumbent, candidate, resamples, confidence, seed)
    incumbent_mean = sum(incumbent.values()) / len(incumbent) if incumbent else 0.0
    promoted = interval.low > margin
    reason = (
        f"lower bound {interval.low:+.4f} > margin {margin:+.4f}"
        if promoted
        else f"lower bound {interval.low:+.4f} <= margin {margin:+.4f}"
    )
    return PromotionDecision(
        promoted,
        metric,
        mean,
        incumbent_mean,
        interval.estimate,
        interval.low,
        interval.high,
        confidence,
        margin,
        reason,
    )
