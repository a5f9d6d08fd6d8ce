"""An OpenAI-compatible HTTP API on the generator app (/v1/models, /v1/completions,
/v1/chat/completions), so any OpenAI client can try each round's model:

    client = openai.OpenAI(base_url="http://localhost:8000/generator/v1", api_key="unused")
    client.completions.create(model="run:demo", prompt="...")

`model` is `run:<run id>` (the model that run's driver promoted last), a preset (builtin:<preset>) or a
model the config allows (model.base, model.allowed_dirs), or "current" for whatever it has loaded; a
checkpoint is never named by its run-store path (HTTP calls carry no run key). Chat requests are
rendered by services/common/rendering.py, as training renders them (the chat template, or the plain
instruction template, per `model.prompt_format`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..common.engines import SamplingParams
from ..common.grpc_handler import token_matches
from ..common.rendering import PromptFormat, Renderer
from ..common.validation import MAX_TEXT_CHARS  # a prompt or a message: gRPC's text limit

MAX_HTTP_BODY_BYTES = 8 * 1024 * 1024  # 256 ASCII prompts of 20,000 characters fit; JSON-escaped text takes more
MAX_STOP_CHARS = 64  # every stop string is matched against the answer's tail at every step
MAX_PROMPT_IDS = 8192

openai_app = FastAPI(title="reinstruct generator", description="OpenAI-compatible completions for each round's model")


class AdmitBeforeTheBody:
    """ASGI middleware: the bearer token and the body's size are checked before the body is read
    (FastAPI reads and parses a whole body before any dependency runs: a 256 MiB POST without a token
    once grew the replica by 1.2 GB). 401 without the token, 413 past MAX_HTTP_BODY_BYTES, whether
    Content-Length says so at once or the chunks add up to it."""

    def __init__(self, app, limit: int = MAX_HTTP_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes here: nothing else passes without a check
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not token_matches(headers.get("authorization")):
            await _reply(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
            return
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > self.limit:
            await _reply(send, 413, f"the body is {declared} bytes; the limit is {self.limit}")
            return
        received, replied, started = 0, False, False

        async def counted():
            nonlocal received, replied
            if replied:  # the app reads nothing more once the 413 went out
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not started:  # answer now; the app's own reply is dropped
                    replied = True
                    await _reply(send, 413, f"the body is over the limit of {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def unless_replied(message) -> None:
            nonlocal started
            if not replied:
                started = started or message["type"] == "http.response.start"
                await send(message)

        await self.app(scope, counted, unless_replied)


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


openai_app.add_middleware(AdmitBeforeTheBody)

_Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
_Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field("current", max_length=4096)
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: _Stop | Annotated[list[_Stop], Field(max_length=4)] | None = None  # OpenAI's "up to 4"
    seed: int = 0
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, stream: bool) -> bool:
        if stream:  # never ignored silently: a client waiting for events would get one JSON body
            raise ValueError("not supported here: ask without it (vLLM's OpenAI server streams)")
        return stream

    def sampling(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_tokens,
            seed=self.seed,
            stop=tuple(stop),
            presence_penalty=self.presence_penalty,
        )


class CompletionRequest(_Request):
    # text, a batch of texts, or one prompt as token ids (what reinstruct's openai engine sends)
    prompt: (
        _Text
        | Annotated[list[_Text], Field(min_length=1, max_length=256)]
        | Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
    )
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
            if max(self.prompt) >= len(tokenizer):
                raise HTTPException(400, f"prompt: token id {max(self.prompt)} is not in the model's vocabulary")
            return [tokenizer.decode(self.prompt)]
        return list(self.prompt)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(..., max_length=MAX_TEXT_CHARS)


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
