"""An OpenAI-compatible HTTP API on the generator app (/v1/models, /v1/completions,
/v1/chat/completions), so any OpenAI client can try each round's model:

    client = openai.OpenAI(base_url="http://localhost:8000/generator/v1", api_key="unused")
    client.completions.create(model="runs/demo/round-002/model", prompt="...")

`model` is a checkpoint the generator may load (a run-store path or builtin:<preset>), or "current"
for whatever it has loaded. Chat requests use the model's chat template when it has one, else the
instruction template the model was trained with."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..common.records import Instance, TaskRecord
from ..trainer.formatting import render
from .engines import SamplingParams

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
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_tokens,
                              seed=self.seed, stop=tuple(stop[:4]), presence_penalty=self.presence_penalty)


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., max_length=256)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(..., max_length=20_000)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    users = [m.content for m in messages if m.role == "user"]
    if not users:
        raise HTTPException(400, "messages: at least one user message is needed")
    task = TaskRecord(id="chat", instruction=users[-1])
    return render(task, Instance("", "")).prompt


def completion_response(model: str, texts: list[tuple[str, str]], kind: str) -> dict:
    created = int(time.time())
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                   for i, (text, reason) in enumerate(texts)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": created,
                "model": model, "choices": choices}
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, reason) in enumerate(texts)]
    return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": created,
            "model": model, "choices": choices}
