"""Self-Instruct's heuristic rules, each returning the reason a record is rejected (or None)."""

from __future__ import annotations

import re
import string

from ..common.records import Instance

# Words a text-only model cannot act on (Self-Instruct, Section 2.3).
DEFAULT_BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                     "map", "maps", "draw", "plot", "go to")


def instruction_rejection(instruction: str, min_words: int = 4, max_words: int = 150,
                          blacklist: tuple[str, ...] = DEFAULT_BLACKLIST) -> str | None:
    words = instruction.split()
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


def clean_instances(instances: list[Instance], max_output_chars: int = 4000) -> tuple[list[Instance], list[str]]:
    """Drops empty/over-long outputs, outputs that repeat the input, exact duplicates, and every
    instance whose input also appears with a different output. Returns (kept, reasons removed)."""
    reasons, kept = [], []
    for inst in instances:
        output = inst.output.strip()
        if not output:
            reasons.append("empty_output")
        elif len(output) > max_output_chars:
            reasons.append("output_too_long")
        elif inst.input.strip() and output == inst.input.strip():
            reasons.append("output_repeats_input")
        elif any(k.input.strip() == inst.input.strip() and k.output.strip() == output for k in kept):
            reasons.append("duplicate_instance")
        else:
            kept.append(inst)
    outputs_by_input: dict[str, set[str]] = {}
    for inst in kept:
        outputs_by_input.setdefault(inst.input.strip(), set()).add(inst.output.strip())
    conflicting = {inp for inp, outs in outputs_by_input.items() if len(outs) > 1}
    if conflicting:
        reasons.extend("same_input_different_output" for k in kept if k.input.strip() in conflicting)
        kept = [k for k in kept if k.input.strip() not in conflicting]
    return kept, reasons
