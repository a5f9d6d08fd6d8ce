"""Instruction backtranslation: a backward model writes instructions for unlabelled text
(self-augmentation), and the forward model rates each pair 1-5 (self-curation)."""

from __future__ import annotations

import random
import re

from ..common import prompts
from ..common.records import Instance, Lineage, TaskRecord, stable_id

BACKWARD_STOPS = ("\n\n\n", "\nResponse:")  # an instruction may carry a context paragraph
_SCORE = re.compile(
    rf"score\s*[:=]?\s*\**\s*([{prompts.CURATION_SCORES[1]}-{prompts.CURATION_SCORES[-1]}])\b", re.IGNORECASE
)


def build_backward_prompt(output: str) -> str:
    return prompts.BACKWARD.render(output=output.strip())


def parse_backward(completion: str) -> str:
    """The instruction the backward model wrote: up to two paragraphs (an instruction and the context
    it gives, as the seed prompts it learnt from), each paragraph's whitespace collapsed."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", completion.strip())]
    return "\n\n".join(p for p in paragraphs[:2] if p)


def seed_prompt(task: TaskRecord, instance: Instance) -> str:
    """The whole prompt side of a seed example: instruction, and its input when it has one."""
    return task.instruction.strip() + (f"\n\n{instance.input.strip()}" if instance.input.strip() else "")


def build_rating_prompt(instruction: str, input_text: str, output: str) -> str:
    full = seed_prompt(TaskRecord(id="", instruction=instruction), Instance(input_text, output))
    return prompts.CURATE.render(instruction=full, output=output.strip())


def parse_rating(completion: str) -> int:
    """The last 'Score: N' (1-5) in the completion; 0 when there is none (unparseable counts as 0)."""
    matches = _SCORE.findall(completion or "")
    return int(matches[-1]) if matches else 0


def backward_tasks(seed_tasks: list[TaskRecord]) -> list[TaskRecord]:
    """(output -> instruction) pairs from the seed data, as raw tasks for the trainer. The target is
    the whole prompt side (instruction + input): "negative" alone does not say "Classify the review";
    Humpback's x is everything the user wrote."""
    out = []
    for task in seed_tasks:
        for j, inst in enumerate(task.instances):
            if not inst.output.strip():
                continue
            out.append(
                TaskRecord(
                    id=f"backward-{task.id}-{j}",
                    instruction=build_backward_prompt(inst.output),
                    instances=[Instance("", " " + seed_prompt(task, inst))],
                    format="raw",
                    lineage=Lineage(
                        stage="backward_data", model="human", prompt_template=prompts.BACKWARD.id, parent_id=task.id
                    ),
                )
            )
    return out


def curation_meta_tasks(seed_tasks: list[TaskRecord], seed: int) -> list[TaskRecord]:
    """Teach the rating format: a seed pair is a 5, a pair with another task's output a 1 or 2."""
    rng = random.Random(seed)
    out = []
    for task in seed_tasks:
        inst = task.instances[0]
        good = build_rating_prompt(task.instruction, inst.input, inst.output)
        out.append(
            TaskRecord(
                id=f"meta-curate-good-{task.id}",
                instruction=good,
                format="raw",
                instances=[Instance("", " The response answers the instruction.\nScore: 5")],
                lineage=Lineage(stage="meta_task", model="human", prompt_template=prompts.CURATE.id),
            )
        )
        other = rng.choice([t for t in seed_tasks if t.id != task.id])
        bad = build_rating_prompt(task.instruction, inst.input, other.instances[0].output)
        score = rng.choice([1, 2])
        out.append(
            TaskRecord(
                id=f"meta-curate-bad-{task.id}",
                instruction=bad,
                format="raw",
                instances=[Instance("", f" The response is about something else.\nScore: {score}")],
                lineage=Lineage(stage="meta_task", model="human", prompt_template=prompts.CURATE.id),
            )
        )
    return out


def augmented_task(
    run_id: str, round_index: int, model: str, segment_id: str, segment: str, instruction: str
) -> TaskRecord:
    """The id comes from the segment's own id, so it does not depend on how a stage was split into requests."""
    return TaskRecord(
        id=stable_id(run_id, round_index, "backtranslate", segment_id),
        instruction=instruction,
        instances=[Instance("", segment)],
        lineage=Lineage(
            run_id=run_id,
            round=round_index,
            stage="backtranslate",
            model=model,
            prompt_template=prompts.BACKWARD.id,
            parent_id=segment_id,
        ),
    )
