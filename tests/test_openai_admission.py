"""The OpenAI endpoint's admission, without Ray: the token and the body's size are checked before the
body is read, and every field a request's cost grows with is bounded. (Through Serve's HTTP proxy:
test_auth_and_limits.test_openai_http_api_needs_the_token and its oversized-body test.)"""

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from services.common.grpc_handler import API_TOKEN_ENV
from services.generator.openai_api import (
    MAX_STOP_CHARS,
    AdmitBeforeTheBody,
    ChatRequest,
    CompletionRequest,
)


def _client(monkeypatch, limit: int = 1000):
    monkeypatch.setenv(API_TOKEN_ENV, "secret")
    app = FastAPI()
    bodies = []

    @app.post("/echo")
    async def echo(payload: dict):
        bodies.append(payload)
        return {"ok": True}

    app.add_middleware(AdmitBeforeTheBody, limit=limit)
    return TestClient(app), bodies


def test_the_token_is_checked_before_the_body_is_read(monkeypatch):
    client, bodies = _client(monkeypatch)
    refused = client.post("/echo", content=b"{" * 5000)  # no token: never parsed, whatever its size
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert client.post("/echo", json={"a": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/echo", json={"a": 1}, headers={"Authorization": "Bearer secret"}).json() == {"ok": True}
    assert bodies == [{"a": 1}]


def test_a_body_over_the_limit_is_refused_declared_or_streamed(monkeypatch):
    client, bodies = _client(monkeypatch, limit=1000)
    auth = {"Authorization": "Bearer secret"}
    declared = client.post("/echo", content=b'{"a": "' + b"x" * 2000 + b'"}', headers=auth)
    assert declared.status_code == 413 and "limit is 1000" in declared.json()["detail"]

    def chunks():  # no Content-Length: the chunks add up past the limit
        yield b'{"a": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    streamed = client.post("/echo", content=chunks(), headers=auth)
    assert streamed.status_code == 413 and bodies == []
    assert client.post("/echo", json={"a": "x" * 900}, headers=auth).status_code == 200


def test_what_a_request_costs_is_bounded_field_by_field():
    assert CompletionRequest(prompt="x" * 20_000).prompt
    for prompt in ("x" * 20_001, ["x"] * 257, ["x" * 20_001], list(range(8193)), []):
        with pytest.raises(ValidationError, match="prompt"):
            CompletionRequest(prompt=prompt)
    with pytest.raises(ValidationError, match="stop"):
        CompletionRequest(prompt="x", stop="y" * (MAX_STOP_CHARS + 1))
    with pytest.raises(ValidationError, match="stop"):
        CompletionRequest(prompt="x", stop=["a", "b", "c", "d", "e"])  # OpenAI's limit is 4; none dropped silently
    assert CompletionRequest(prompt="x", stop=["a", "b", "c", "d"]).sampling().stop == ("a", "b", "c", "d")
    with pytest.raises(ValidationError, match="stream"):
        ChatRequest(messages=[{"role": "user", "content": "hi"}], stream=True)
    assert ChatRequest(messages=[{"role": "user", "content": "hi"}]).sampling().max_new_tokens == 128


def test_token_ids_and_odd_scopes_are_refused(monkeypatch):
    for ids in ([-1], [1 << 40]):
        with pytest.raises(ValidationError, match="prompt"):
            CompletionRequest(prompt=ids)
    monkeypatch.setenv(API_TOKEN_ENV, "secret")
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["type"])

    async def send(message):
        sent.append(message)

    import asyncio

    admit = AdmitBeforeTheBody(app)
    asyncio.run(admit({"type": "websocket", "headers": []}, None, send))
    asyncio.run(admit({"type": "lifespan"}, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == ["lifespan"]
