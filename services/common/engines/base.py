"""The interface every engine implements. Every engine turns text into token ids with
services/common/rendering.py (the rule training uses), so one model sees its text one way."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.5
    max_new_tokens: int = 128
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated (OpenAI's rule)
    max_prompt_tokens: int = 0  # a longer prompt keeps its last tokens, as in training; 0: no limit


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (cut by max_new_tokens)
    num_tokens: int = 0


class GenerationEngine(Protocol):
    model_uri: str | None  # what load() last made current
    tokenizer: Any  # the current model's tokenizer (None where the engine has no local copy)

    def load(self, model_uri: str) -> None:
        """Makes model_uri the model that generate() uses; a no-op when it already is."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]: ...

    def score_nll(self, prompts: list[str], responses: list[str], max_len: int = 0) -> list[float]:
        """Mean negative log-likelihood per response token (EOS included), given its prompt, tokenized
        exactly as training tokenizes (max_len: training's max_seq_len; 0: no limit)."""


class ModelSessions:
    """`with engine.using(model_uri): ...` loads the model and keeps it current until the block ends:
    one replica serving two models at once never answers a request with the other model (load and
    generate are one step). Engines make `_lock` an RLock of their own, taken by load, generate and
    score_nll too."""

    _lock = threading.RLock()

    @contextlib.contextmanager
    def using(self, model_uri: str) -> Iterator[ModelSessions]:
        with self._lock:
            self.load(model_uri)
            yield self
