"""Any OpenAI-compatible endpoint (a vLLM server, a hosted teacher model, reinstruct's own generator
app): async requests with a concurrency limit, retries with backoff on 429/5xx, timeouts."""

from __future__ import annotations

import asyncio
import os
import random

import aiohttp

from .base import Completion, SamplingParams

RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


class OpenAIError(RuntimeError):
    pass


class OpenAIEngine:
    def __init__(self, *, base_url: str, api_key_env: str = "OPENAI_API_KEY", model: str | None = None,
                 concurrency: int = 8, timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 0.5,
                 **_ignored) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env, "")
        self.model = model
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    def load(self, model_uri: str) -> None:
        """The model name sent with each request (a fixed `model` from the config wins)."""
        self.model_uri = model_uri

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        return asyncio.run(self._generate_all(prompts, params))

    def score_nll(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError("the OpenAI API gives no log-likelihood of a given text; use the hf engine")

    async def _generate_all(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        semaphore = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with aiohttp.ClientSession(timeout=self.timeout, headers=headers) as session:
            return list(await asyncio.gather(*(self._one(session, semaphore, p, params, i) for i, p in enumerate(prompts))))

    async def _one(self, session, semaphore, prompt: str, params: SamplingParams, index: int) -> Completion:
        body = {"model": self.model or getattr(self, "model_uri", "current"), "prompt": prompt,
                "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "seed": params.seed + index, "presence_penalty": params.presence_penalty}
        if params.stop:
            body["stop"] = list(params.stop)[:4]  # the OpenAI API takes at most 4 stop sequences
        async with semaphore:
            for attempt in range(self.max_retries + 1):
                try:
                    async with session.post(f"{self.base_url}/completions", json=body) as response:
                        if response.status == 200:
                            choice = (await response.json())["choices"][0]
                            return Completion(choice.get("text", ""), "length" if choice.get("finish_reason") == "length"
                                              else "stop")
                        text = await response.text()
                        if response.status not in RETRYABLE or attempt == self.max_retries:
                            raise OpenAIError(f"{response.status} from {self.base_url}/completions: {text[:300]}")
                        delay = float(response.headers.get("Retry-After") or self.backoff_s * 2**attempt)
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                    if attempt == self.max_retries:
                        raise OpenAIError(f"{self.base_url} unreachable after {attempt + 1} tries: {exc!r}") from exc
                    delay = self.backoff_s * 2**attempt
                await asyncio.sleep(delay * (0.5 + random.random()))
        raise OpenAIError("unreachable")  # the loop always returns or raises
