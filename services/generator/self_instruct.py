"""Self-Instruct (Wang et al., ACL 2023): building its prompts and parsing what the model writes.

Pure functions: no model, no Ray. Parsers never raise on messy text; they return fewer items.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..common import prompts
from ..common.records import TaskRecord

INSTRUCTION_STOPS = ("\n\n", "\n17.", "\n17 .")
INSTANCE_STOPS = ("\nTask:", "\n\n\n")
_NUMBERED_ITEM = re.compile(r"\n\s*\d+\s?\.\s?")


@dataclass
class InstructionPrompt:
    text: str
    template_id: str
    context_task_ids: list[str]


def build_instruction_prompt(
    human: list[TaskRecord],
    machine: list[TaskRecord],
    rng: random.Random,
    num_human: int = 6,
    num_machine: int = 2,
    classification_only: bool = False,
) -> InstructionPrompt:
    """8 in-context instructions: num_human seed tasks + num_machine pool tasks (fewer while the pool
    is small; the human share fills the gap), shuffled, numbered, ending with the next number."""
    machine_take = min(num_machine, len(machine))
    human_take = min(len(human), num_human + (num_machine - machine_take))
    chosen = rng.sample(human, human_take) + rng.sample(machine, machine_take)
    rng.shuffle(chosen)
    template = prompts.CLASSIFICATION_INSTRUCTIONS if classification_only else prompts.INSTRUCTIONS
    text = template.render(numbered=prompts.numbered_instructions([t.instruction for t in chosen]))
    return InstructionPrompt(text, template.id, [t.id for t in chosen])


def parse_instructions(completion: str, finish_reason: str) -> list[str]:
    """Instructions written after the final 'N.' of the prompt. A completion cut by the length limit
    yields nothing from its last item, which may be half an instruction."""
    items = _NUMBERED_ITEM.split("\n" + completion.split("\n\n")[0])
    items = [re.sub(r"\s+", " ", item).strip() for item in items]
    if finish_reason == "length" and items:
        items = items[:-1]
    return [item for item in items if item]


def build_classification_prompt(instruction: str) -> tuple[str, str]:
    return prompts.IS_CLASSIFICATION.render(instruction=_one_line(instruction)), prompts.IS_CLASSIFICATION.id


def parse_is_classification(completion: str) -> bool:
    """'Yes' (any case, leading space or punctuation allowed) means classification; anything else no."""
    match = re.match(r"\W*(\w+)", completion)
    return bool(match) and match.group(1).lower() == "yes"


def build_instance_prompt(
    task_instruction: str, is_classification: bool, demonstrations: list[TaskRecord]
) -> tuple[str, str]:
    """Output-first for classification tasks, input-first otherwise, with seed demonstrations."""
    blocks = []
    for demo in demonstrations:
        pairs = [(i.input, i.output) for i in demo.instances]
        body = prompts.output_first_block(pairs) if is_classification else prompts.input_first_block(pairs)
        blocks.append(f"Task: {_one_line(demo.instruction)}\n{body}\n")
    template = prompts.INSTANCES_OUTPUT_FIRST if is_classification else prompts.INSTANCES_INPUT_FIRST
    return template.render(demonstrations="".join(blocks), instruction=_one_line(task_instruction)), template.id


def parse_input_first(completion: str, finish_reason: str) -> list[tuple[str, str]]:
    """'Example k / Input: / Output:' blocks (or a lone 'Output:') -> [(input, output)]."""
    text = completion.split("\nTask:")[0]
    chunks = [c for c in re.split(r"(?:^|\n)\s*Example\s*\d+\s*:?\s*\n", text) if c.strip()]
    if finish_reason == "length" and chunks:
        chunks = chunks[:-1]
    pairs = []
    for chunk in chunks:
        if "Output:" not in chunk:
            continue
        before, output = chunk.split("Output:", 1)
        inp = before.split("Input:", 1)[1] if "Input:" in before else ""
        output = output.strip()
        if output:
            pairs.append((inp.strip(), output))
    return pairs


def parse_output_first(completion: str, finish_reason: str) -> list[tuple[str, str]]:
    """'Class label: L / Input: I' blocks -> [(input, label)]."""
    text = completion.split("\nTask:")[0]
    chunks = [c for c in re.split(r"(?:^|\n)\s*Class label\s*:", text) if c.strip()]
    if finish_reason == "length" and chunks:
        chunks = chunks[:-1]
    pairs = []
    for chunk in chunks:
        label, _, rest = chunk.partition("\n")
        label = label.strip()
        inp = rest.split("Input:", 1)[1] if "Input:" in rest else ""
        if label:
            pairs.append((inp.strip(), label))
    return pairs


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
