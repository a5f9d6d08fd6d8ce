"""The evaluator's logic: greedy answers on held-out tasks, scored by exact ROUGE-L."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.records import TaskRecord
from ..common.rouge import rouge_l
from ..generator.engines import GenerationEngine, SamplingParams
from ..trainer.formatting import render


@dataclass
class TaskScore:
    task_id: str
    rouge_l: float
    instances: int


@dataclass
class Evaluation:
    rouge_l: float
    tasks: list[TaskScore]
    num_instances: int


class EvaluatorService:
    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    def evaluate(self, model_uri: str, tasks: list[TaskRecord], max_instances_per_task: int,
                 sampling: SamplingParams) -> Evaluation:
        self.engine.load(model_uri)
        items = []
        for task in tasks:
            instances = task.instances[:max_instances_per_task] if max_instances_per_task else task.instances
            items.extend((task.id, render(task, inst), inst.output) for inst in instances)
        completions = self.engine.generate([example.prompt for _, example, _ in items],
                                           SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                                          max_new_tokens=sampling.max_new_tokens, seed=sampling.seed,
                                                          stop=("\n\n",)))
        per_task: dict[str, list[float]] = {}
        for (task_id, _, reference), completion in zip(items, completions):
            per_task.setdefault(task_id, []).append(rouge_l(completion.text.strip(), reference))
        scores = [TaskScore(tid, sum(v) / len(v), len(v)) for tid, v in per_task.items()]
        mean = sum(s.rouge_l for s in scores) / len(scores) if scores else 0.0
        return Evaluation(mean, scores, len(items))
