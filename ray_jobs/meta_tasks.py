"""Round 0 and later training mixes: meta-tasks that teach a model to run Self-Instruct itself.

A model that emits noise has every instruction filtered out, so before the first round the base model
is fine-tuned on the seed tasks rendered in exactly the layouts Self-Instruct prompts with: writing
the next instructions of a numbered list, answering the classification question, and writing
instances. These are `raw` tasks: the instruction is the exact prompt, the output the completion.
"""

from __future__ import annotations

import random

from services.common import prompts
from services.common.config import TrainingConfig
from services.common.records import Instance, Lineage, TaskRecord, stable_id
from services.generator import self_instruct as si


def _raw(task_id: str, prompt: str, completion: str, template_id: str, context: list[str]) -> TaskRecord:
    return TaskRecord(
        id=task_id,
        instruction=prompt,
        instances=[Instance("", completion)],
        format="raw",
        lineage=Lineage(stage="meta_task", model="human", prompt_template=template_id, context_task_ids=context),
    )


def build_meta_tasks(
    human: list[TaskRecord],
    machine: list[TaskRecord],
    seed: int,
    examples_per_task: int = TrainingConfig().bootstrap_examples_per_task,
    targets_per_prompt: int = 4,
) -> list[TaskRecord]:
    rng = random.Random(seed)
    everything = human + machine
    out: list[TaskRecord] = []
    n_prompts = max(1, examples_per_task * len(human) // 4)
    for n in range(n_prompts):
        prompt = si.build_instruction_prompt(human, machine, rng)
        shown = set(prompt.context_task_ids)
        unseen = [t for t in everything if t.id not in shown]
        targets = rng.sample(unseen, min(targets_per_prompt, len(unseen)))
        start = len(shown) + 1
        lines = [f" {targets[0].instruction.strip()}"] + [
            f"{start + i}. {t.instruction.strip()}" for i, t in enumerate(targets[1:], start=1)
        ]
        out.append(
            _raw(
                f"meta-instructions-{stable_id(seed, n)}",
                prompt.text,
                "\n".join(lines),
                prompt.template_id,
                prompt.context_task_ids + [t.id for t in targets],
            )
        )
    for task in everything:
        text, template_id = si.build_classification_prompt(task.instruction)
        out.append(
            _raw(f"meta-classify-{task.id}", text, " Yes" if task.is_classification else " No", template_id, [task.id])
        )
        same_kind = [t for t in human if t.is_classification == task.is_classification and t.id != task.id]
        demos = rng.sample(same_kind, min(2, len(same_kind)))
        text, template_id = si.build_instance_prompt(task.instruction, task.is_classification, demos)
        pairs = [(i.input, i.output) for i in task.instances]
        body = prompts.output_first_block(pairs) if task.is_classification else prompts.input_first_block(pairs)
        out.append(
            _raw(f"meta-instances-{task.id}", text, body.rstrip("\n"), template_id, [d.id for d in demos] + [task.id])
        )
    return out
