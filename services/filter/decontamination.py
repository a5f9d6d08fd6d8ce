"""Decontamination: training data must not contain long n-grams of the evaluation sets."""

from __future__ import annotations

from ..common import deadline
from ..common.records import TaskRecord
from ..common.rouge import tokenize

SHORT_TEXT_MIN_TOKENS = 8  # an eval text shorter than the n-gram counts when copied whole, from this length


def _task_text(task: TaskRecord) -> list[str]:
    return [task.instruction] + [part for inst in task.instances for part in (inst.input, inst.output)]


class ContaminationIndex:
    """Every n-gram (filter.decontamination_ngram tokens: 13 by default, as in GPT-3's and FLAN's
    decontamination) of the eval tasks, and their shorter texts whole. Building it and checking a
    task are linear in their tokens (short texts are found by their first tokens, never scanned one
    by one), and both stop when the request's budget ends."""

    def __init__(self, eval_tasks: list[TaskRecord], n: int) -> None:
        self.n = n
        self._ngrams: set[tuple[str, ...]] = set()
        self._short_texts: dict[tuple[str, ...], set[tuple[str, ...]]] = {}  # by their first tokens
        for position, task in enumerate(eval_tasks):
            if position % 64 == 0:
                deadline.check()
            for text in _task_text(task):
                tokens = tuple(tokenize(text))
                if len(tokens) >= n:
                    self._ngrams.update(tokens[i : i + n] for i in range(len(tokens) - n + 1))
                elif len(tokens) >= SHORT_TEXT_MIN_TOKENS:
                    self._short_texts.setdefault(tokens[:SHORT_TEXT_MIN_TOKENS], set()).add(tokens)

    def __bool__(self) -> bool:
        return bool(self._ngrams or self._short_texts)

    def contaminated(self, task: TaskRecord) -> bool:
        for text in _task_text(task):
            deadline.check()
            tokens = tuple(tokenize(text))
            n = self.n
            if self._ngrams and any(tokens[i : i + n] in self._ngrams for i in range(len(tokens) - n + 1)):
                return True
            k = SHORT_TEXT_MIN_TOKENS
            for i in range(len(tokens) - k + 1) if self._short_texts else ():
                for short in self._short_texts.get(tokens[i : i + k], ()):
                    if tokens[i : i + len(short)] == short:
                        return True
        return False
