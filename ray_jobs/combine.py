"""One evaluation from the evaluations of its shards: the same means over tasks that one request
over all tasks gives (services.evaluator.metrics.mean_over_tasks)."""

from __future__ import annotations

from services.api import evaluator_pb2


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def combine(parts: list[evaluator_pb2.EvaluateModelResponse]) -> evaluator_pb2.EvaluateModelResponse:
    tasks = [t for part in parts for t in part.tasks]
    names = sorted({t.category for t in tasks})
    return evaluator_pb2.EvaluateModelResponse(
        rouge_l=_mean([t.rouge_l for t in tasks]),
        score=_mean([t.score for t in tasks]),
        exact_match=_mean([t.exact_match for t in tasks if t.category == "classification"]),
        nll=_mean([t.nll for t in tasks]),
        answer_words=_mean([t.answer_words for t in tasks]),
        answer_tokens=_mean([t.answer_tokens for t in tasks]),
        truncated=_mean([t.truncated for t in tasks]),
        stops=parts[0].stops if parts else [],  # one request's choice: every shard gets the same
        num_tasks=len(tasks),
        num_instances=sum(part.num_instances for part in parts),
        tasks=tasks,
        categories=[
            evaluator_pb2.CategoryScore(
                category=name,
                score=_mean([t.score for t in tasks if t.category == name]),
                tasks=sum(t.category == name for t in tasks),
            )
            for name in names
        ],
    )
