"""Any OpenAI-compatible endpoint (a vLLM server, a hosted teacher model, reinstruct's own generator
app): async requests with a concurrency limit, retries with backoff on 429/5xx, timeouts.

Where the model is a local checkpoint (a round's model in the run store, a preset), its tokenizer is
loaded here and prompts travel as token ids (the completions API takes them), tokenized by the rule
training uses; score_nll and logprob_of_continuations ask for the prompt's own log-probs (`echo` with
`logprobs`, as vLLM's server gives them). A remote model without a local tokenizer gets text prompts,
and logprob_of_continuations reads the first answer token's top log-probs instead."""

from __future__ import annotations

import asyncio
import math
import os
import random
import threading

import aiohttp

from ..config import GenerationConfig
from ..models import DEFAULT_CACHE_DIR, load_tokenizer, resolve_model
from ..rendering import NO_LIMIT, Example, encode_prompt, mean_response_nll, tokenize
from .base import Completion, ModelSessions, SamplingParams, continuation_tokens, labelled_sum

_DEFAULTS = GenerationConfig()  # every default lives in config.py

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}
TOP_LOGPROBS = 5  # the most OpenAI's completions API returns (vLLM's server allows more)


class OpenAIError(RuntimeError):
    pass


class OpenAIEngine(ModelSessions):
    def __init__(
        self,
        *,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        model: str | None = None,
        concurrency: int = _DEFAULTS.openai_concurrency,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        cache_dir: str = DEFAULT_CACHE_DIR,
        trust_remote_code: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env, "")
        self.model = model
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cache_dir = cache_dir
        self.trust_remote_code = trust_remote_code
        self.model_uri: str | None = None
        self.tokenizer = None
        self._lock = threading.RLock()

    def load(self, model_uri: str) -> None:
        """The model name sent with each request (a fixed `model` from the config wins), and its
        tokenizer where the model is a local checkpoint."""
        with self._lock:
            if model_uri == self.model_uri:
                return
            path = resolve_model(model_uri, self.cache_dir) if model_uri.startswith(("builtin:", "/")) else ""
            self.tokenizer = load_tokenizer(path, trust_remote_code=self.trust_remote_code) if path else None
            self.model_uri = model_uri

    def _prompt(self, text: str, max_len: int) -> str | list[int]:
        return text if self.tokenizer is None else encode_prompt(self.tokenizer, text, max_len=max_len)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        bodies = []
        for index, prompt in enumerate(prompts):
            body = {
                "prompt": self._prompt(prompt, params.max_prompt_tokens),
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed + index,
                "presence_penalty": params.presence_penalty,
            }
            if params.stop:
                body["stop"] = list(params.stop)[:4]  # the OpenAI API takes at most 4 stop sequences
            bodies.append(body)
        with self._lock:  # the model named in each body is the current one until the answers are in
            choices = asyncio.run(self._post_all(bodies))
        return [
            Completion(c.get("text", ""), "length" if c.get("finish_reason") == "length" else "stop") for c in choices
        ]

    def score_nll(self, prompts: list[str], responses: list[str], max_len: int = 0) -> list[float]:
        with self._lock:
            return self._score_nll(prompts, responses, max_len)

    def _score_nll(self, prompts: list[str], responses: list[str], max_len: int) -> list[float]:
        if self.tokenizer is None:
            raise OpenAIError(
                f"scoring needs the model's tokenizer, and {self.model_uri!r} is no local checkpoint; "
                "set evaluation.with_nll: false for remote models"
            )
        features = [
            tokenize(Example(p, r, "", ""), self.tokenizer, max_len or NO_LIMIT, False)
            for p, r in zip(prompts, responses)
        ]
        choices = asyncio.run(
            self._post_all(
                [
                    {"prompt": f["input_ids"], "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0}
                    for f in features
                ]
            )
        )
        return [
            mean_response_nll(f["input_ids"], f["labels"], c["logprobs"]["token_logprobs"][: len(f["input_ids"])])
            for f, c in zip(features, choices)
        ]

    def logprob_of_continuations(self, prompt: str, continuations: list[str]) -> list[float]:
        with self._lock:
            if self.tokenizer is None:
                return self._first_token_logprobs(prompt, continuations)
            features = [continuation_tokens(self.tokenizer, prompt, c) for c in continuations]
            choices = asyncio.run(
                self._post_all(
                    [
                        {"prompt": f["input_ids"], "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0}
                        for f in features
                    ]
                )
            )
            return [
                labelled_sum(f["labels"], c["logprobs"]["token_logprobs"][: len(f["input_ids"])])
                for f, c in zip(features, choices)
            ]

    def _first_token_logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        """A remote model (no local tokenizer, no echo): the top log-probs of the first token it would
        write, each continuation matched by its text (leading spaces aside). Exact only for one-token
        continuations (a rating's digit); one not among the top tokens gets the lowest log-prob listed,
        an upper bound of its own."""
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": TOP_LOGPROBS}
        choice = asyncio.run(self._post_all([body]))[0]
        top = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
        by_text: dict[str, float] = {}
        for text, logprob in (top[0] or {}).items():
            key = text.strip()
            by_text[key] = logprob if key not in by_text else math.log(math.exp(by_text[key]) + math.exp(logprob))
        if not by_text:
            raise OpenAIError(f"{self.base_url}/completions gave no top_logprobs (logprobs={TOP_LOGPROBS} was asked)")
        floor = min(by_text.values())
        return [by_text.get(c.strip(), floor) for c in continuations]

    async def _post_all(self, bodies: list[dict]) -> list[dict]:
        semaphore = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with aiohttp.ClientSession(timeout=self.timeout, headers=headers) as session:
            return list(await asyncio.gather(*(self._one(session, semaphore, b) for b in bodies)))

    async def _one(self, session, semaphore, body: dict) -> dict:
        body = {"model": self.model or self.model_uri or "current", **body}
        async with semaphore:
            for attempt in range(self.max_retries + 1):
                try:
                    async with session.post(f"{self.base_url}/completions", json=body) as response:
                        if response.status == 200:
                            return (await response.json())["choices"][0]
                        text = await response.text()
                        # x-should-retry: false (OpenAI's own header): the server says a retry would fail
                        # the same way, e.g. reinstruct's generator past its request budget
                        final = response.headers.get("x-should-retry", "").lower() == "false"
                        if response.status not in RETRYABLE or final or attempt == self.max_retries:
                            raise OpenAIError(f"{response.status} from {self.base_url}/completions: {text[:300]}")
                        delay = float(response.headers.get("Retry-After") or self.backoff_s * 2**attempt)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    if attempt == self.max_retries:
                        raise OpenAIError(f"{self.base_url} unreachable after {attempt + 1} tries: {exc!r}") from exc
                    delay = self.backoff_s * 2**attempt
                await asyncio.sleep(delay * (0.5 + random.random()))
        raise OpenAIError("unreachable")  # the loop always returns or raises
