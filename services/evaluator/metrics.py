"""Reference-based metrics: exact match on the label for classification tasks, ROUGE-L (the filter's
exact implementation) for generation tasks; per task, per category, and overall means over tasks."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..common.records import TaskRecord
from ..common.rouge import rouge_l


def normalize_label(text: str) -> str:
    """Case, surrounding punctuation and whitespace do not change a label ('Positive.' == 'positive')."""
    first_line = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", re.sub(r"^[\W_]+|[\W_]+$", "", first_line.lower())).strip()


def exact_match(prediction: str, reference: str) -> float:
    return 1.0 if normalize_label(prediction) == normalize_label(reference) and normalize_label(reference) else 0.0


def category(task: TaskRecord) -> str:
    return "classification" if task.is_classification else "generation"


@dataclass
class TaskResult:
    task_id: str
    category: str
    rouge_l: list[float] = field(default_factory=list)
    exact_match: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    answer_words: list[float] = field(default_factory=list)  # every answer, with a reference or not
    answer_tokens: list[float] = field(default_factory=list)
    truncated: list[float] = field(default_factory=list)  # 1.0 where max_new_tokens cut the answer

    @property
    def score(self) -> float:
        """The primary metric: exact match for classification, ROUGE-L for generation."""
        values = self.exact_match if self.category == "classification" else self.rouge_l
        return sum(values) / len(values) if values else 0.0

    def mean(self, name: str) -> float:
        values = getattr(self, name)
        return sum(values) / len(values) if values else 0.0


def score_instance(result: TaskResult, prediction: str, reference: str) -> None:
    result.rouge_l.append(rouge_l(prediction.strip(), reference))
    if result.category == "classification":
        result.exact_match.append(exact_match(prediction, reference))


def mean_over_tasks(results: list[TaskResult], metric: str, category_name: str | None = None) -> float:
    chosen = [r for r in results if category_name is None or r.category == category_name]
    if not chosen:
        return 0.0
    values = [r.score if metric == "score" else r.mean(metric) for r in chosen]
    return sum(values) / len(values)
