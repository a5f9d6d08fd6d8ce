"""Decontamination: training data must not contain long n-grams of the evaluation sets."""

from __future__ import annotations

from ..common.records import TaskRecord
from ..common.rouge import tokenize


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = tokenize(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _task_text(task: TaskRecord) -> list[str]:
    return [task.instruction] + [part for inst in task.instances for part in (inst.input, inst.output)]


class ContaminationIndex:
    """Every n-gram (filter.decontamination_ngram tokens: 13 by default, as in GPT-3's and FLAN's
    decontamination) of the eval tasks."""

    def __init__(self, eval_tasks: list[TaskRecord], n: int) -> None:
        self.n = n
        self._ngrams: set[tuple[str, ...]] = set()
        self._short_texts: set[tuple[str, ...]] = set()
        for task in eval_tasks:
            for text in _task_text(task):
                tokens = tuple(tokenize(text))
                if len(tokens) >= n:
                    self._ngrams |= _ngrams(text, n)
                elif len(tokens) >= 8:  # short eval texts count when copied whole
                    self._short_texts.add(tokens)

    def __bool__(self) -> bool:
        return bool(self._ngrams or self._short_texts)

    def contaminated(self, task: TaskRecord) -> bool:
        for text in _task_text(task):
            if self._ngrams and not _ngrams(text, self.n).isdisjoint(self._ngrams):
                return True
            if self._short_texts:
                tokens = tokenize(text)
                for short in self._short_texts:
                    if _contains(tokens, short):
                        return True
        return False


def _contains(tokens: list[str], part: tuple[str, ...]) -> bool:
    n = len(part)
    return any(tuple(tokens[i : i + n]) == part for i in range(len(tokens) - n + 1))
