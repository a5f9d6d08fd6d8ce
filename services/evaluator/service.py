"""The evaluator's logic: greedy answers on held-out tasks, reference metrics, judged comparisons."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..common.engines import GenerationEngine, SamplingParams
from ..common.records import Instance, Lineage, TaskRecord
from ..common.rendering import DEFAULT_PROMPT_FORMAT, NO_LIMIT, PromptFormat, Renderer
from . import judge as judging
from .intervals import Interval, length_controlled_difference, paired_difference
from .metrics import TaskResult, category, mean_over_tasks, score_instance


@dataclass
class Evaluation:
    model_uri: str
    tasks: list[TaskResult]
    num_instances: int
    predictions: list[TaskRecord]
    stops: tuple[str, ...] = ()  # what ended answers besides EOS: a recorded choice

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

    @property
    def answer_words(self) -> float:
        return mean_over_tasks(self.tasks, "answer_words")

    @property
    def answer_tokens(self) -> float:
        return mean_over_tasks(self.tasks, "answer_tokens")

    @property
    def truncated(self) -> float:
        return mean_over_tasks(self.tasks, "truncated")

    def per_task(self, metric: str = "score") -> dict[str, float]:
        return {t.task_id: (t.score if metric == "score" else t.mean(metric)) for t in self.tasks}

    def strata(self) -> dict[str, str]:
        return {t.task_id: t.category for t in self.tasks}

    def categories(self) -> dict[str, tuple[float, int]]:
        names = sorted({t.category for t in self.tasks})
        return {n: (mean_over_tasks(self.tasks, "score", n), sum(t.category == n for t in self.tasks)) for n in names}


@dataclass
class Comparison:
    a: Evaluation
    b: Evaluation
    score_difference: Interval
    rouge_l_difference: Interval
    length_controlled_score_difference: Interval
    nll_gain: Interval  # A's NLL minus B's: positive when B is likelier on the references
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
        prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
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
        stop: tuple[str, ...] = (),
        nll_instances_per_task: int = 0,
    ) -> Evaluation:
        """Answers end where a user's would: at the model's EOS (chat) or the plain template's own end,
        or at one of `stop` (evaluation.stop), within sampling.max_new_tokens. The reference NLL
        (with_nll) covers nll_instances_per_task instances of each task (0: all): a forward pass
        each, far cheaper than an answer, so the gate's metric sees every reference."""
        with self.engine.using(model_uri):
            items = _items(tasks, max_instances_per_task)
            nll_items = (
                [(t, i) for t, i in _items(tasks, nll_instances_per_task) if i.output.strip()] if with_nll else []
            )
            total = len(items) + len(nll_items)
            renderer = Renderer.for_tokenizer(self.engine.tokenizer, self.prompt_format, seed_tag=self.seed_tag)
            stops = tuple(dict.fromkeys(renderer.answer_ends + tuple(stop)))
            params = replace(sampling, stop=stops, max_prompt_tokens=self.max_seq_len)
            results: dict[str, TaskResult] = {}
            predictions: list[TaskRecord] = []
            seen: dict[str, int] = {}
            for start in range(0, len(items), self.chunk_size):
                chunk = items[start : start + self.chunk_size]
                examples = [renderer.render(task, inst) for task, inst in chunk]
                completions = self.engine.generate([e.prompt for e in examples], params)
                for (task, inst), example, completion in zip(chunk, examples, completions):
                    result = results.setdefault(task.id, TaskResult(task.id, category(task)))
                    seen[task.id] = seen.get(task.id, -1) + 1
                    result.answer_words.append(len(completion.text.split()))
                    result.answer_tokens.append(completion.num_tokens)
                    result.truncated.append(1.0 if completion.finish_reason == "length" else 0.0)
                    has_reference = bool(inst.output.strip())  # prompts without references: judged only
                    if has_reference:
                        score_instance(result, completion.text, inst.output)
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
                    on_progress(min(start + self.chunk_size, len(items)), total)
            for start in range(0, len(nll_items), self.chunk_size):
                chunk = [(t, i) for t, i in nll_items[start : start + self.chunk_size] if t.id in results]
                examples = [renderer.render(task, inst) for task, inst in chunk]
                nlls = self.engine.score_nll(
                    [e.prompt for e in examples], [e.response for e in examples], self.max_seq_len
                )
                for (task, _), nll in zip(chunk, nlls):
                    results[task.id].nll.append(nll)
                if on_progress is not None:
                    on_progress(len(items) + min(start + self.chunk_size, len(nll_items)), total)
            ordered = [results[t.id] for t in tasks if t.id in results and results[t.id].rouge_l]
            return Evaluation(model_uri, ordered, len(items), predictions, stops)

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
        method: str,
        stratify: bool,
        with_nll: bool = False,
        stop: tuple[str, ...] = (),
        nll_instances_per_task: int = 0,
    ) -> Comparison:
        """judge_model "": no judged comparison (Comparison.judged is None, never reported as ties)."""
        options = {"with_nll": with_nll, "stop": stop, "nll_instances_per_task": nll_instances_per_task}
        a = self.evaluate(model_a, tasks, max_instances_per_task, sampling, **options)
        b = self.evaluate(model_b, tasks, max_instances_per_task, sampling, **options)
        judged = self._judge(judge_model, a, b) if judge_model else None
        options = {
            "method": method,
            "confidence": confidence,
            "resamples": resamples,
            "strata": a.strata() if stratify else None,
        }
        return Comparison(
            a,
            b,
            paired_difference(a.per_task(), b.per_task(), **options),
            paired_difference(a.per_task("rouge_l"), b.per_task("rouge_l"), **options),
            length_controlled_difference(
                a.per_task(),
                b.per_task(),
                a.per_task("answer_words"),
                b.per_task("answer_words"),
                confidence=confidence,
            ),
            paired_difference(b.per_task("nll"), a.per_task("nll"), **options),
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
