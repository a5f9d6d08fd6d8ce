"""Self-Instruct's heuristic rules, each returning the reason a record is rejected (or None)."""

from __future__ import annotations

import random
import re
import string

from ..common.records import Instance
from ..common.rouge import tokenize

# Words a text-only model cannot act on (Self-Instruct, Section 2.3).
DEFAULT_BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
)


def instruction_rejection(
    instruction: str, min_words: int = 4, max_words: int = 150, blacklist: tuple[str, ...] = DEFAULT_BLACKLIST
) -> str | None:
    words = instruction.split()
    if not words:
        return "empty_instruction"
    if len(words) < min_words:
        return "too_short"
    if len(words) > max_words:
        return "too_long"
    lowered = instruction.lower()
    for word in blacklist:
        if re.search(rf"\b{re.escape(word.lower())}\b", lowered):
            return f"blacklisted:{word}"
    if lowered.startswith("write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_with_non_ascii"
    return None


def clean_instances(
    instances: list[Instance],
    max_output_chars: int = 4000,
    *,
    instruction: str = "",
    shown: list[Instance] | None = None,
    classification: bool = False,
) -> tuple[list[Instance], list[str]]:
    """Self-Instruct's instance rules (generate_instances.py / prepare_for_finetuning.py): drops empty
    and over-long outputs, outputs equal to the input, inputs or outputs ending with ':' (usually a
    cut generation), and exact duplicates; a task whose instances give different outputs for the same
    non-empty input loses all of them (the reference drops the task). Two rules of ours: an input that
    repeats the instruction, and an instance that copies one of `shown` (the instances of the tasks
    its instance prompt showed as demonstrations): its output, or for a classification task its input
    (labels are meant to recur across tasks, inputs are not). Returns (kept, reasons)."""
    reasons, kept = [], []
    instruction_tokens = tokenize(instruction)
    shown_outputs = {_same_text(i.output) for i in shown or []} - {""}
    shown_inputs = {_same_text(i.input) for i in shown or []} - {""}
    for inst in instances:
        output, given = inst.output.strip(), inst.input.strip()
        if not output:
            reasons.append("empty_output")
        elif len(output) > max_output_chars:
            reasons.append("output_too_long")
        elif given and output == given:
            reasons.append("output_repeats_input")
        elif output.endswith(":") or given.endswith(":"):
            reasons.append("ends_with_colon")
        elif instruction_tokens and tokenize(given)[: len(instruction_tokens)] == instruction_tokens:
            reasons.append("input_repeats_instruction")
        elif _same_text(given if classification else output) in (shown_inputs if classification else shown_outputs):
            reasons.append("copies_demonstration")
        elif any(k.input.strip() == given and k.output.strip() == output for k in kept):
            reasons.append("duplicate_instance")
        else:
            kept.append(inst)
    outputs_by_input: dict[str, set[str]] = {}
    for inst in kept:
        if inst.input.strip():  # tasks without input may well have several right answers
            outputs_by_input.setdefault(inst.input.strip(), set()).add(inst.output.strip())
    if any(len(outputs) > 1 for outputs in outputs_by_input.values()):
        return [], reasons + ["same_input_different_output"] * len(kept)
    return kept, reasons


def _same_text(text: str) -> str:
    """Equal for texts that differ in case, spacing or surrounding punctuation only (any script)."""
    return " ".join(text.casefold().split()).strip(string.punctuation + " ")


def sample_instances(instances: list[Instance], limit: int, seed: str) -> list[Instance]:
    """At most `limit` instances chosen at random (the reference keeps up to 5 after cleaning), in
    their original order; reproducible per task."""
    if limit <= 0 or len(instances) <= limit:
        return instances
    chosen = sorted(random.Random(seed).sample(range(len(instances)), limit))
    return [instances[i] for i in chosen]
