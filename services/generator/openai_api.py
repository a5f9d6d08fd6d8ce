"""An OpenAI-compatible HTTP API on the generator app (/v1/models, /v1/completions,
/v1/chat/completions), so any OpenAI client can try each round's model:

    client = openai.OpenAI(base_url="http://localhost:8000/generator/v1", api_key="unused")
    client.completions.create(model="runs/demo/round-002/model", prompt="...")

`model` is a checkpoint the generator may load (a run-store path or builtin:<preset>), or "current"
for whatever it has loaded. Chat requests are rendered by services/common/rendering.py, as training
renders them (the chat template, or the plain instruction template, per `model.prompt_format`)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..common.engines import SamplingParams
from ..common.rendering import PromptFormat, Renderer

openai_app = FastAPI(title="reinstruct generator", description="OpenAI-compatible completions for each round's model")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = "current"
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int = 0
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=1)

    def sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_tokens,
            seed=self.seed,
            stop=tuple(stop[:4]),
            presence_penalty=self.presence_penalty,
        )


class CompletionRequest(_Request):
    # text, a batch of texts, or one prompt as token ids (what reinstruct's openai engine sends)
    prompt: str | list[str] | list[int] = Field(..., max_length=256)
    echo: bool = False

    def texts(self, tokenizer) -> list[str]:
        if self.echo:
            raise HTTPException(400, "echo: not supported here (vLLM's OpenAI server has it)")
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            if tokenizer is None:
                raise HTTPException(400, "prompt: token ids need the model's tokenizer; this engine has none")
            # ids made by rendering.encode_prompt decode to the text they came from; the engine encodes
            # that text by the same rule again
            return [tokenizer.decode(self.prompt)]
        return list(self.prompt)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(..., max_length=20_000)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)


def chat_prompt(tokenizer, messages: list[ChatMessage], prompt_format: PromptFormat) -> tuple[str, tuple[str, ...]]:
    """The conversation rendered as training renders it, and where the answer ends unless the request
    says otherwise: at the model's EOS with a chat template (nothing else), at the plain template's
    next part without one (the evaluator's rule: a user gets the answer the gate scored)."""
    if tokenizer is None:
        raise HTTPException(400, "model: chat needs the model's tokenizer; this engine has none for it")
    try:
        renderer = Renderer.for_tokenizer(tokenizer, prompt_format)
        return renderer.chat([m.model_dump() for m in messages]), renderer.answer_ends
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


def completion_response(model: str, texts: list[tuple[str, str]], kind: str) -> dict:
    created = int(time.time())
    if kind == "chat":
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for i, (text, reason) in enumerate(texts)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
    choices = [
        {"index": i, "text": text, "finish_reason": reason, "logprobs": None} for i, (text, reason) in enumerate(texts)
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:12]}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
