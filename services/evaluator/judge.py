"""Pairwise judging: each pair is judged in both orders to cancel position bias."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..common import prompts

_VERDICT = re.compile(r"verdict\s*[:\-]?\s*\**\s*(response\s+)?(a|b|tie)\b", re.IGNORECASE)


def build_judge_prompt(instruction: str, input_text: str, response_a: str, response_b: str) -> str:
    input_block = f"Input: {input_text.strip()}\n" if input_text.strip() else ""
    return prompts.PAIRWISE_JUDGE.render(
        instruction=instruction.strip(),
        input_block=input_block,
        response_a=response_a.strip(),
        response_b=response_b.strip(),
    )


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie', or None when the judge gave no readable verdict (the last one counts)."""
    matches = _VERDICT.findall(text or "")
    if not matches:
        return None
    choice = matches[-1][1].lower()
    return "tie" if choice == "tie" else choice.upper()


def combine(first: str | None, swapped: str | None) -> str:
    """first: verdict with (A=model a, B=model b); swapped: verdict with the order reversed.
    Returns 'b_wins', 'a_wins' or 'tie' (disagreement and unreadable verdicts are ties)."""
    unswapped = {"A": "a", "B": "b", "tie": "tie", None: None}[first]
    reswapped = {"A": "b", "B": "a", "tie": "tie", None: None}[swapped]
    if unswapped == reswapped == "b":
        return "b_wins"
    if unswapped == reswapped == "a":
        return "a_wins"
    return "tie"


@dataclass(frozen=True)
class JudgedRates:
    win: float
    tie: float
    loss: float
    pairs: int


def rates(outcomes: list[str]) -> JudgedRates:
    n = len(outcomes)
    if n == 0:
        return JudgedRates(0.0, 0.0, 0.0, 0)
    return JudgedRates(outcomes.count("b_wins") / n, outcomes.count("tie") / n, outcomes.count("a_wins") / n, n)
