"""The interface every engine implements. Every engine turns text into token ids with
services/common/rendering.py (the rule training uses), so one model sees its text one way."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import GenerationConfig
from ..rendering import IGNORE_INDEX, NO_LIMIT, Example, tokenize

_GENERATION = GenerationConfig()  # the defaults live in the config alone


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = _GENERATION.temperature  # 0: greedy
    top_p: float = _GENERATION.top_p
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

    def logprob_of_continuations(self, prompt: str, continuations: list[str]) -> list[float]:
        """For each continuation, the sum of log p of its tokens after `prompt` (already rendered), no
        EOS, tokenized as score_nll tokenizes a (prompt, response) pair: `continuation_tokens` below.
        Reading a rating from probabilities ("Score: " then "1".."5") needs no generated text."""


def continuation_tokens(tokenizer, prompt: str, continuation: str, encoder_decoder: bool = False) -> dict:
    """input_ids and labels of prompt + continuation as rendering.tokenize makes them for score_nll and
    training (the text tokenized once, the continuation's tokens found by character offsets, so a
    token spanning the boundary, " 5" after "Score:", counts as the continuation's), without the EOS
    that tokenize appends. Then sum(log p) over the labelled positions is exactly the part of
    score_nll's sum that belongs to the continuation's own tokens. Every engine calls this."""
    features = tokenize(Example(prompt, continuation, "", ""), tokenizer, NO_LIMIT, encoder_decoder)
    if encoder_decoder:  # labels are the decoder's target: drop its EOS
        return {"input_ids": features["input_ids"], "labels": features["labels"][:-1]}
    ids, labels = features["input_ids"][:-1], features["labels"][:-1]
    return {"input_ids": ids, "labels": labels}


def labelled_sum(labels: list[int], logprobs: list[float | None]) -> float:
    """Sum of log p over the labelled positions, given each position's log-prob of its own token."""
    return float(sum(lp for lp, label in zip(logprobs, labels) if label != IGNORE_INDEX and lp is not None))


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
