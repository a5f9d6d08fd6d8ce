"""The evaluator's logic: greedy answers on held-out tasks, reference metrics, judged comparisons."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..common.engines import GenerationEngine, SamplingParams
from ..common.records import Instance, Lineage, TaskRecord
from ..common.rendering import NO_LIMIT, PromptFormat, Renderer
from . import judge as judging
from .bootstrap import Interval, paired_difference
from .metrics import TaskResult, category, mean_over_tasks, score_instance

STOPS = ("\n\n",)


@dataclass
class Evaluation:
    model_uri: str
    tasks: list[TaskResult]
    num_instances: int
    predictions: list[TaskRecord]

    @property
    def rouge_l(self) -> float:
        return mean_over_tasks(self.tasks, "rouge_l")

    @property
    def score(self) -> float:
        return mean_over_tasks(self.tasks, "score")

    @property
    def exact_match(self) -> float:
        return mean_over_tasks(self.tasks, "exact_match", "classification")

    @property
    def nll(self) -> float:
        return mean_over_tasks(self.tasks, "nll")

    def per_task(self, metric: str = "score") -> dict[str, float]:
        return {t.task_id: (t.score if metric == "score" else t.mean(metric)) for t in self.tasks}

    def categories(self) -> dict[str, tuple[float, int]]:
        names = sorted({t.category for t in self.tasks})
        return {n: (mean_over_tasks(self.tasks, "score", n), sum(t.category == n for t in self.tasks)) for n in names}


@dataclass
class Comparison:
    a: Evaluation
    b: Evaluation
    score_difference: Interval
    rouge_l_difference: Interval
    judged: judging.JudgedRates | None


def _items(tasks: list[TaskRecord], max_instances_per_task: int) -> list[tuple[TaskRecord, Instance]]:
    items = []
    for task in tasks:
        instances = task.instances[:max_instances_per_task] if max_instances_per_task else task.instances
        items.extend((task, inst) for inst in instances)
    return items


class EvaluatorService:
    """prompt_format and max_seq_len are the model's and the trainer's (config.model.prompt_format,
    config.training.max_seq_len): a held-out task is rendered, cut and scored as training would."""

    def __init__(
        self,
        engine: GenerationEngine,
        prompt_format: PromptFormat = "auto",
        max_seq_len: int = NO_LIMIT,
        chunk_size: int = 16,
        seed_tag: str = "",
    ) -> None:
        self.engine = engine
        self.prompt_format = prompt_format
        self.seed_tag = seed_tag
        self.max_seq_len = max_seq_len
        self.chunk_size = chunk_size

    def evaluate(
        self,
        model_uri: str,
        tasks: list[TaskRecord],
        max_instances_per_task: int,
        sampling: SamplingParams,
        with_nll: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
        run_id: str = "",
        round_index: int = 0,
    ) -> Evaluation:
        with self.engine.using(model_uri):
            items = _items(tasks, max_instances_per_task)
            params = replace(sampling, stop=STOPS, max_prompt_tokens=self.max_seq_len)
            renderer = Renderer.for_tokenizer(self.engine.tokenizer, self.prompt_format, seed_tag=self.seed_tag)
            results: dict[str, TaskResult] = {}
            predictions: list[TaskRecord] = []
            seen: dict[str, int] = {}
            for start in range(0, len(items), self.chunk_size):
                chunk = items[start : start + self.chunk_size]
                examples = [renderer.render(task, inst) for task, inst in chunk]
                completions = self.engine.generate([e.prompt for e in examples], params)
                nlls = (
                    self.engine.score_nll(
                        [e.prompt for e in examples], [e.response for e in examples], self.max_seq_len
                    )
                    if with_nll
                    else []
                )
                for j, ((task, inst), example, completion) in enumerate(zip(chunk, examples, completions)):
                    result = results.setdefault(task.id, TaskResult(task.id, category(task)))
                    seen[task.id] = seen.get(task.id, -1) + 1
                    has_reference = bool(inst.output.strip())  # prompts without references: judged only
                    if has_reference:
                        score_instance(result, completion.text, inst.output)
                        if with_nll:
                            result.nll.append(nlls[j])
                    predictions.append(
                        TaskRecord(
                            id=f"{task.id}/{seen[task.id]}",  # the task's instance: shard-independent
                            instruction=task.instruction,
                            name=task.name,
                            is_classification=task.is_classification,
                            instances=[Instance(inst.input, completion.text.strip())],
                            lineage=Lineage(
                                run_id=run_id,
                                round=round_index,
                                stage="evaluate",
                                model=model_uri,
                                prompt_template=example.template_id,
                                parent_id=task.id,
                                scores={
                                    "rouge_l": result.rouge_l[-1],
                                    **({"exact_match": result.exact_match[-1]} if result.exact_match else {}),
                                }
                                if has_reference
                                else {},
                            ),
                        )
                    )
                if on_progress is not None:
                    on_progress(min(start + self.chunk_size, len(items)), len(items))
            ordered = [results[t.id] for t in tasks if t.id in results and results[t.id].rouge_l]
            return Evaluation(model_uri, ordered, len(items), predictions)

    def compare(
        self,
        model_a: str,
        model_b: str,
        tasks: list[TaskRecord],
        max_instances_per_task: int,
        sampling: SamplingParams,
        judge_model: str,
        resamples: int,
        confidence: float,
    ) -> Comparison:
        """judge_model "": no judged comparison (Comparison.judged is None, never reported as ties)."""
        a = self.evaluate(model_a, tasks, max_instances_per_task, sampling)
        b = self.evaluate(model_b, tasks, max_instances_per_task, sampling)
        judged = self._judge(judge_model, a, b) if judge_model else None
        return Comparison(
            a,
            b,
            paired_difference(a.per_task(), b.per_task(), resamples, confidence),
            paired_difference(a.per_task("rouge_l"), b.per_task("rouge_l"), resamples, confidence),
            judged,
        )

    def _judge(self, judge_model: str, a: Evaluation, b: Evaluation) -> judging.JudgedRates:
        with self.engine.using(judge_model):
            pairs = list(zip(a.predictions, b.predictions))
            prompts = []
            for pa, pb in pairs:
                inst_a, inst_b = pa.instances[0], pb.instances[0]
                prompts.append(judging.build_judge_prompt(pa.instruction, inst_a.input, inst_a.output, inst_b.output))
                prompts.append(judging.build_judge_prompt(pa.instruction, inst_a.input, inst_b.output, inst_a.output))
            completions = self.engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=64))
            outcomes = [
                judging.combine(
                    judging.parse_verdict(completions[2 * i].text), judging.parse_verdict(completions[2 * i + 1].text)
                )
                for i in range(len(pairs))
            ]
            return judging.rates(outcomes)
