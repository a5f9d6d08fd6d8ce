"""Self-Instruct (Wang et al., ACL 2023): building its prompts and parsing what the model writes.

Pure functions: no model, no Ray. Parsers never raise on messy text; they return fewer items.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..common import prompts
from ..common.config import GenerationConfig
from ..common.records import Instance, TaskRecord

_DEFAULTS = GenerationConfig()  # the one set of defaults (services/common/config.py)

# The reference's stop sequences (bootstrap_instructions.py): a blank line ends the list, and so does
# item 16, so a completion adds at most items 9-15 to a prompt of 8.
INSTRUCTION_STOPS = ("\n\n", "\n16", "16.", "16 .")
_LAST_ITEM = 15  # what the stops above leave; an engine that ignores stops gets the same list
INSTANCE_STOPS = ("\nTask:", "\n\n\n")
# "10. text" at the start of a line ("10 .", "10.text" too); "10.5 kg" is not an item number
_NUMBERED_LINE = re.compile(r"\s*(\d+)\s?\.(?!\d)\s*(.*)")


@dataclass
class InstructionPrompt:
    text: str
    template_id: str
    context_task_ids: list[str]


def build_instruction_prompt(
    human: list[TaskRecord],
    machine: list[TaskRecord],
    rng: random.Random,
    num_human: int = _DEFAULTS.num_human_in_context,
    num_machine: int = _DEFAULTS.num_machine_in_context,
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


def parse_instructions(completion: str, finish_reason: str, first_number: int) -> list[str]:
    """Instructions written after the prompt's final 'N.' (first_number: N, 9 for 8 tasks in context):
    items N, N+1, ... up to 15, each whitespace-collapsed; the list ends at a blank line or at the first
    number out of sequence. An item ending with ':' may announce a sub-list: lines '1.', '2.', ... right
    after it are folded into it, one per line (followed by the next item instead, it is an instruction
    whose input comes with its instances, as in the seeds). A completion cut by the length limit loses
    the item the cut fell in, which may be half an instruction."""
    text, blank_line, _ = completion.partition("\n\n")
    lines = text.split("\n")
    items, expected, sub_expected = [[lines[0]]], first_number + 1, None  # item: lead line, sub-items
    ran_to_end = not blank_line
    for line in lines[1:]:
        match = _NUMBERED_LINE.fullmatch(line)
        if match is None:
            items[-1][-1] += " " + line  # a continuation of the item (or sub-item) above
            continue
        number = int(match.group(1))
        announces_list = sub_expected is None and _one_line(items[-1][0]).endswith(":")
        if number == expected and number <= _LAST_ITEM:
            items.append([match.group(2)])
            expected, sub_expected = expected + 1, None
        elif number == sub_expected or (announces_list and number == 1):
            # Folded, not dropped: the sub-items are what the item asks for (criteria, options, steps),
            # the item without them is incomplete, and they are no tasks on their own.
            items[-1].append(f"{number}. {match.group(2)}")
            sub_expected = number + 1
        else:
            ran_to_end = False  # a break in the numbering, or item 16: the list ends here
            break
    if finish_reason == "length" and ran_to_end:
        items = items[:-1]
    texts = ["\n".join(_one_line(part) for part in item) for item in items]
    return [text for text in texts if text]


def build_classification_prompt(instruction: str) -> tuple[str, str]:
    return prompts.IS_CLASSIFICATION.render(instruction=_one_line(instruction)), prompts.IS_CLASSIFICATION.id


def parse_is_classification(completion: str) -> bool:
    """'Yes' (any case, leading space or punctuation allowed) means classification; anything else no."""
    match = re.match(r"\W*(\w+)", completion)
    return bool(match) and match.group(1).lower() == "yes"


def demonstration_instances(demo: TaskRecord, limit: int, rng: random.Random) -> list[Instance]:
    """The instances a demonstration shows, in the seed's order: up to `limit`, drawn with rng; for a
    classification task one per label (up to `limit` labels), so that output-first generation sees a
    task's labels side by side, as in the reference's templates (1-2 examples per generation task,
    2-4 labelled ones per classification task)."""
    if not demo.is_classification:
        return [
            demo.instances[i] for i in sorted(rng.sample(range(len(demo.instances)), min(limit, len(demo.instances))))
        ]
    by_label: dict[str, list[int]] = {}
    for index, instance in enumerate(demo.instances):
        by_label.setdefault(_one_line(instance.output).casefold(), []).append(index)
    labels = list(by_label)
    if len(labels) > limit:
        labels = rng.sample(labels, limit)
    return [demo.instances[i] for i in sorted(rng.choice(by_label[label]) for label in labels)]


# lineage.scores key of an instance-stage record: how many of its last context_task_ids are the
# demonstrations its instance prompt showed (appended after the instruction prompt's tasks)
DEMONSTRATIONS = "demonstrations"


def demonstration_ids(task: TaskRecord) -> list[str]:
    """The ids of the tasks the record's instance prompt showed ([] for a record without them)."""
    shown = int(task.lineage.scores.get(DEMONSTRATIONS, 0))
    return task.lineage.context_task_ids[-shown:] if shown > 0 else []


def build_instance_prompt(
    task_instruction: str, is_classification: bool, demonstrations: list[TaskRecord]
) -> tuple[str, str]:
    """Output-first for classification tasks, input-first otherwise, with seed demonstrations (every
    instance they hold: demonstration_instances chooses)."""
    blocks = []
    for demo in demonstrations:
        pairs = [(i.input, i.output) for i in demo.instances]
        body = prompts.output_first_block(pairs) if is_classification else prompts.input_first_block(pairs)
        blocks.append(f"Task: {_one_line(demo.instruction)}\n{body}\n")
    template = prompts.INSTANCES_OUTPUT_FIRST if is_classification else prompts.INSTANCES_INPUT_FIRST
    return template.render(demonstrations="".join(blocks), instruction=_one_line(task_instruction)), template.id


_EXAMPLE_HEADER = re.compile(r"(?:^|\n)\s*Example\s*\d+\s*:?\s*(?:\n|$)")
_INPUT_LINE = re.compile(r"(?:^|\n)[ \t]*Input\s*\d*\s*:")
_INPUT_FIELD = re.compile(r"Input\s*\d*\s*:")
_OUTPUT_FIELD = re.compile(r"Output\s*\d*\s*:")
_CLASS_LABEL = re.compile(r"(?:^|\n)\s*Class label\s*:")


def parse_input_first(completion: str, finish_reason: str) -> list[tuple[str, str]]:
    """'Example k / Input: / Output:' blocks (or a lone 'Output:') -> [(input, output)]. As in the
    reference, the input is what precedes 'Output:', less an 'Input:' field name (another field name,
    'Sentence:', stays: it says what the text is); an output ends at the next 'Example k' or 'Input:'
    line. A completion cut by the length limit loses the instance the cut fell in."""
    parts = []  # (input, output), None where a part holds no 'Output:'; one per 'Input:' line, in order
    for chunk in _EXAMPLE_HEADER.split(completion.split("\nTask:")[0]):
        for position, part in enumerate(_INPUT_LINE.split(chunk)):
            pieces = _OUTPUT_FIELD.split(part, maxsplit=1)
            if len(pieces) < 2:
                parts.append(None)
                continue
            before, output = pieces
            if position == 0:  # no 'Input:' line before it: one within the line still starts the input
                before = _INPUT_FIELD.split(before, maxsplit=1)[-1]
            parts.append((before.strip(), output.strip()))
    if finish_reason == "length" and parts:
        parts = parts[:-1]
    return [part for part in parts if part is not None and part[1]]


def parse_output_first(completion: str, finish_reason: str) -> list[tuple[str, str]]:
    """'Class label: L / <field>: I' blocks -> [(input, label)]. As in the reference, the input is all
    that follows the label line, with its field name ('Review: great phone', 'Document: ... Claim:
    ...': the name says what the text is, and inputs like 'TypeError: ...' start that way too), less
    an 'Input:' field name (our demonstrations' layout). Text before the first 'Class label:' is no
    instance; a completion cut by the length limit loses its last one."""
    chunks = _CLASS_LABEL.split(completion.split("\nTask:")[0])[1:]
    if finish_reason == "length" and chunks:
        chunks = chunks[:-1]
    pairs = []
    for chunk in chunks:
        label, _, rest = chunk.partition("\n")
        field = _INPUT_FIELD.match(rest.strip())
        given = rest.strip()[field.end() :] if field else rest
        if label.strip():
            pairs.append((given.strip(), label.strip()))
    return pairs


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
