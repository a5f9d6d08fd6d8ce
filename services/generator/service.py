"""The generator's logic, callable without Ray: prompts in, TaskRecords with lineage out."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..common.config import GenerationConfig
from ..common.engines import GenerationEngine, SamplingParams
from ..common.records import Instance, Lineage, TaskRecord, stable_id
from ..common.rendering import DEFAULT_PROMPT_FORMAT
from ..common.validation import MAX_INSTANCES_PER_TASK
from . import backtranslation as bt
from . import self_instruct as si

_DEFAULTS = GenerationConfig()  # the one set of defaults (services/common/config.py)


@dataclass
class RunContext:
    run_id: str = ""
    round: int = 0


@dataclass
class InstructionBatch:
    tasks: list[TaskRecord]
    prompts: int
    truncated: int


class GeneratorService:
    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    def generate_instructions(
        self,
        ctx: RunContext,
        model_uri: str,
        human: list[TaskRecord],
        machine: list[TaskRecord],
        num_prompts: int,
        sampling: SamplingParams,
        num_human: int = _DEFAULTS.num_human_in_context,
        num_machine: int = _DEFAULTS.num_machine_in_context,
        classification_only: bool = False,
        first_prompt_index: int = 0,
    ) -> InstructionBatch:
        """Prompts first_prompt_index .. +num_prompts of the round: each prompt's in-context draw and
        record ids depend on its index alone, so a stage sent in parts gives the same tasks."""
        with self.engine.using(model_uri):
            if classification_only:  # Self-Instruct's classification variant shows classification tasks only
                human = [t for t in human if t.is_classification] or human
                machine = [t for t in machine if t.is_classification]
            indices = range(first_prompt_index, first_prompt_index + num_prompts)
            built = [
                si.build_instruction_prompt(
                    human,
                    machine,
                    random.Random(f"{ctx.run_id}/{ctx.round}/{sampling.seed}/{classification_only}/{i}"),
                    num_human,
                    num_machine,
                    classification_only,
                )
                for i in indices
            ]
            params = replace(sampling, stop=si.INSTRUCTION_STOPS, seed=sampling.seed + first_prompt_index)
            completions = self.engine.generate([p.text for p in built], params)
            tasks, truncated = [], 0
            for p_index, prompt, completion in zip(indices, built, completions):
                truncated += completion.finish_reason == "length"
                first_number = len(prompt.context_task_ids) + 1  # the prompt ends with this 'N.'
                parsed = si.parse_instructions(completion.text, completion.finish_reason, first_number)
                for i_index, instruction in enumerate(parsed):
                    tasks.append(
                        TaskRecord(
                            id=stable_id(ctx.run_id, ctx.round, "instruction", classification_only, p_index, i_index),
                            instruction=instruction,
                            lineage=Lineage(
                                run_id=ctx.run_id,
                                round=ctx.round,
                                stage="generate_instructions",
                                model=model_uri,
                                prompt_template=prompt.template_id,
                                context_task_ids=prompt.context_task_ids,
                            ),
                        )
                    )
            return InstructionBatch(tasks, len(built), truncated)

    def classify(
        self, ctx: RunContext, model_uri: str, tasks: list[TaskRecord], max_prompt_tokens: int = 0
    ) -> list[TaskRecord]:
        with self.engine.using(model_uri):
            built = [si.build_classification_prompt(t.instruction) for t in tasks]
            params = SamplingParams(
                temperature=0.0, max_new_tokens=3, stop=("\n",), max_prompt_tokens=max_prompt_tokens
            )
            completions = self.engine.generate([text for text, _ in built], params)
            out = []
            for task, (_, template_id), completion in zip(tasks, built, completions):
                lineage = replace(task.lineage, scores={**task.lineage.scores})
                lineage.scores["is_classification"] = 1.0 if si.parse_is_classification(completion.text) else 0.0
                lineage.verdicts = [*task.lineage.verdicts, f"classified_by:{template_id}"]
                out.append(replace(task, is_classification=bool(lineage.scores["is_classification"]), lineage=lineage))
            return out

    def generate_instances(
        self,
        ctx: RunContext,
        model_uri: str,
        tasks: list[TaskRecord],
        demonstrations: list[TaskRecord],
        num_demonstrations: int,
        sampling: SamplingParams,
        on_progress=None,
        chunk_size: int = 16,
        demonstration_instances: int = _DEFAULTS.demonstration_instances,
        demonstration_labels: int = _DEFAULTS.demonstration_labels,
    ) -> list[TaskRecord]:
        """Tasks that got at least one instance, each with its instances; the others are dropped. Each
        record's lineage gets the demonstrations' ids (si.demonstration_ids reads them back), so the
        filter can drop an instance that copies one."""
        with self.engine.using(model_uri):
            built, shown = [], []
            for task in tasks:
                # drawn per task id, so a stage sent in shards shows each task the same demonstrations
                rng = random.Random(f"{ctx.run_id}/{ctx.round}/instances/{sampling.seed}/{task.id}")
                pool = [d for d in demonstrations if d.is_classification == task.is_classification] or demonstrations
                demos = [
                    replace(
                        d,
                        instances=si.demonstration_instances(
                            d, demonstration_labels if d.is_classification else demonstration_instances, rng
                        ),
                    )
                    for d in rng.sample(pool, min(num_demonstrations, len(pool)))
                ]
                built.append(si.build_instance_prompt(task.instruction, task.is_classification, demos))
                shown.append([d.id for d in demos])
            params = replace(sampling, stop=si.INSTANCE_STOPS)
            completions = []
            for start in range(0, len(built), chunk_size):
                # the seed varies per chunk so that chunking does not repeat the same random stream
                chunk_params = replace(params, seed=params.seed + start)
                completions.extend(
                    self.engine.generate([text for text, _ in built[start : start + chunk_size]], chunk_params)
                )
                if on_progress is not None:
                    on_progress(len(completions), len(built))
            out = []
            for task, (_, template_id), demo_ids, completion in zip(tasks, built, shown, completions):
                parse = si.parse_output_first if task.is_classification else si.parse_input_first
                # every parsed instance goes on: the filter cleans them, then keeps a random few (the reference)
                pairs = parse(completion.text, completion.finish_reason)[:MAX_INSTANCES_PER_TASK]
                if not pairs:
                    continue
                lineage = replace(
                    task.lineage,
                    context_task_ids=[*task.lineage.context_task_ids, *demo_ids],
                    scores={**task.lineage.scores, si.DEMONSTRATIONS: float(len(demo_ids))},
                    verdicts=[*task.lineage.verdicts, f"instances_by:{template_id}"],
                )
                out.append(replace(task, instances=[Instance(i, o) for i, o in pairs], lineage=lineage))
            return out

    def backtranslate(
        self, ctx: RunContext, backward_model: str, segments: list[tuple[str, str]], sampling: SamplingParams
    ) -> list[TaskRecord]:
        """One instruction per (segment id, text) from the backward model; segments it wrote nothing
        for, or only the segment's own text, are dropped."""
        with self.engine.using(backward_model):
            completions = self.engine.generate(
                [bt.build_backward_prompt(text) for _, text in segments], replace(sampling, stop=bt.BACKWARD_STOPS)
            )
            out = []
            for (segment_id, text), completion in zip(segments, completions):
                instruction = bt.parse_backward(completion.text)
                if instruction and not bt.repeats_segment(instruction, text):
                    out.append(bt.augmented_task(ctx.run_id, ctx.round, backward_model, segment_id, text, instruction))
            return out

    def curate(
        self,
        ctx: RunContext,
        model_uri: str,
        tasks: list[TaskRecord],
        rater: str,
        prompt_format: str = DEFAULT_PROMPT_FORMAT,
    ) -> list[TaskRecord]:
        """Adds lineage score 'curation' (1-5, higher is better; 0 when no rating could be read) to every
        task, read from the model's probabilities by the rater (backtranslation.RATERS), with the
        rater's raw figure beside it."""
        with self.engine.using(model_uri):
            ratings = bt.rate(self.engine, tasks, rater, prompt_format)
            out = []
            for task, scores in zip(tasks, ratings):
                lineage = replace(
                    task.lineage,
                    scores={**task.lineage.scores, **scores},
                    verdicts=[*task.lineage.verdicts, f"curated_by:{model_uri}", f"rater:{bt.rater_id(rater)}"],
                )
                out.append(replace(task, lineage=lineage))
            return out
