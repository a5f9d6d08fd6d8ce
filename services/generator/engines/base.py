"""The interface every engine implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.5
    max_new_tokens: int = 128
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0  # vLLM and OpenAI engines; transformers has no equivalent


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (cut by max_new_tokens)
    num_tokens: int = 0


class GenerationEngine(Protocol):
    def load(self, model_uri: str) -> None:
        """Makes model_uri the model that generate() uses; a no-op when it already is."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]: ...

    def score_nll(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Mean negative log-likelihood per response token, given its prompt."""
