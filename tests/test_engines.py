"""The engines behind one interface: hf on the tiny model, openai against local servers (its retry
logic against a scripted one; the project's own OpenAI-compatible server in test_e2e_grpc), and the
vllm adapter against a stand-in `vllm` module (vLLM's GPU engine cannot run on these machines)."""

import sys
import types

import pytest
from aiohttp import web

from services.common.engines import SamplingParams, create_engine
from services.common.engines.openai import OpenAIError
from tests.loopback import LoopbackServer


def test_hf_engine_batched_equals_unbatched_greedy(builtin_cache):
    engine = create_engine("hf", batch_size=4, cache_dir=builtin_cache)
    engine.load("builtin:tiny-llama")
    prompts = [
        "Come up with a series of tasks:\n1.",
        "Task: Name a colour.\nAnswer:",
        "Hi",
        "Write a poem about a very long river.",
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]  # left padding changes nothing
    assert all(c.finish_reason in ("stop", "length") for c in batched)
    sampled = engine.generate(prompts[:2], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3))
    again = engine.generate(prompts[:2], SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3))
    assert [c.text for c in sampled] == [c.text for c in again]  # seeded sampling is reproducible
    assert len(engine.score_nll(["Say hi:"], [" hi"])) == 1


def test_hf_engine_encoder_decoder(builtin_cache):
    engine = create_engine("hf", cache_dir=builtin_cache)
    engine.load("builtin:tiny-t5")
    out = engine.generate(["Task: Name a colour.\nAnswer:"], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert len(out) == 1 and out[0].num_tokens <= 6


class _ScriptedServer(LoopbackServer):
    """An OpenAI-like server on loopback that fails the first `failures` calls with 429/503."""

    def __init__(self, failures: int, status: int = 429):
        self.failures, self.status, self.calls, self.bodies = failures, status, 0, []

    async def completions(self, request):
        self.calls += 1
        self.bodies.append(await request.json())
        if self.calls <= self.failures:
            return web.Response(status=self.status, text="slow down", headers={"Retry-After": "0.01"})
        body = self.bodies[-1]
        return web.json_response({"choices": [{"text": f" echo:{body['prompt']}", "finish_reason": "stop"}]})


def test_openai_engine_retries_on_429_then_succeeds():
    with _ScriptedServer(failures=2) as server:
        engine = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", backoff_s=0.01)
        engine.load("my-model")
        out = engine.generate(["a", "b"], SamplingParams(max_new_tokens=5, stop=("\n", "x", "y", "z", "w")))
    assert [c.text for c in out] == [" echo:a", " echo:b"]
    assert server.calls == 4
    assert server.bodies[-1]["model"] == "my-model" and len(server.bodies[-1]["stop"]) == 4


def test_openai_engine_gives_up_with_a_clear_error():
    with _ScriptedServer(failures=100, status=503) as server:
        engine = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", backoff_s=0.001, max_retries=2)
        engine.load("m")
        with pytest.raises(OpenAIError, match="503"):
            engine.generate(["a"], SamplingParams())
    assert server.calls == 3
    with _ScriptedServer(failures=100, status=400) as server:  # not retryable
        engine = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", backoff_s=0.001)
        engine.load("m")
        with pytest.raises(OpenAIError, match="400"):
            engine.generate(["a"], SamplingParams())
    assert server.calls == 1


def test_vllm_adapter_against_stand_in(monkeypatch, builtin_cache):
    """A stand-in for the `vllm` package at the boundary we cannot reach here (its GPU engine)."""
    built, slept = [], []

    class SamplingParamsStub:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLMStub:
        def __init__(self, model, **options):
            built.append((model, options))
            self.model = model

        def generate(self, prompts, params, use_tqdm=False):
            self.last_params, self.last_prompts = params.kwargs, prompts
            out = types.SimpleNamespace(text="done", finish_reason="length", token_ids=[1, 2])
            return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

        def sleep(self, level):
            slept.append((self.model, level))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLMStub, SamplingParams=SamplingParamsStub))
    engine = create_engine("vllm", cache_dir=builtin_cache, gpu_memory_utilization=0.5)
    engine.load("builtin:tiny-llama")
    engine.load("builtin:tiny-llama")  # same weights: nothing rebuilt
    out = engine.generate(
        ["p"],
        SamplingParams(temperature=0.7, top_p=0.5, max_new_tokens=9, stop=("\n\n",), seed=4, presence_penalty=2.0),
    )
    assert (out[0].text, out[0].finish_reason, out[0].num_tokens) == ("done", "length", 2)
    assert engine.llm.last_params == {
        "temperature": 0.7,
        "top_p": 0.5,
        "max_tokens": 9,
        "stop": ["\n\n"],
        "seed": 4,
        "presence_penalty": 2.0,
    }
    assert engine.llm.last_prompts == [{"prompt_token_ids": engine.tokenizer("p", add_special_tokens=False).input_ids}]
    engine.load("builtin:tiny-t5")  # next round: the old engine sleeps, a new one loads
    assert [m.rsplit("/", 1)[-1] for m, _ in built] == ["tiny-llama-v2", "tiny-t5-v2"]
    assert slept == [(built[0][0], 2)]
    assert built[0][1]["gpu_memory_utilization"] == 0.5 and built[0][1]["enable_sleep_mode"] is True


def test_presence_penalty_follows_openai_rule(builtin_cache):
    """A flat penalty on every token already in the completion (not the prompt, not per occurrence)."""
    import torch

    from services.common.engines.hf import PresencePenalty

    ids = torch.tensor([[7, 7, 1, 2, 2, 3]])  # prompt [7, 7], completion so far [1, 2, 2, 3]
    scores = PresencePenalty(1.5, prompt_len=2)(ids, torch.zeros(1, 10))
    assert scores[0].tolist() == [0, -1.5, -1.5, -1.5, 0, 0, 0, 0, 0, 0]
    engine = create_engine("hf", cache_dir=builtin_cache)
    engine.load("builtin:tiny-llama")
    prompt = ["Come up with a series of tasks:\n1."]
    plain = engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=40))[0]
    penalised = engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=40, presence_penalty=2.0))[0]
    tokens = lambda c: engine.tokenizer(c.text, add_special_tokens=False).input_ids  # noqa: E731
    assert len(set(tokens(penalised))) / len(tokens(penalised)) > len(set(tokens(plain))) / len(tokens(plain))


def test_one_replica_serving_two_models_never_mixes_them(builtin_cache):
    """Concurrent requests for two models on one engine: each answer comes from the model it asked
    for (load and generate are one step: engine.using)."""
    from concurrent.futures import ThreadPoolExecutor

    engine = create_engine("hf", cache_dir=builtin_cache, batch_size=2)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    prompt = ["Task: Name a colour.\nAnswer:"]
    expected = {}
    for uri in ("builtin:tiny-llama", "builtin:tiny-t5"):
        with engine.using(uri):
            expected[uri] = (engine.generate(prompt, params)[0].text, engine.score_nll(prompt, [" blue"])[0])
    assert expected["builtin:tiny-llama"] != expected["builtin:tiny-t5"]

    def ask(i: int):
        uri = ("builtin:tiny-llama", "builtin:tiny-t5")[i % 2]
        with engine.using(uri):
            return uri, (engine.generate(prompt, params)[0].text, engine.score_nll(prompt, [" blue"])[0])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    assert all(answer == expected[uri] for uri, answer in answers)
