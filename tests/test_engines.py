"""The engines behind one interface: hf on the tiny model, openai against local servers (its retry
logic against a scripted one; the project's own OpenAI-compatible server in test_e2e_grpc), and the
vllm engine's GPU-only path (sleep mode, in-place reloads, tensor parallelism) against a stand-in
`vllm` module, as no GPU is at hand; everything the CPU build can do runs for real in
tests/test_vllm_cpu.py, tests/test_one_rendering.py and tests/test_vllm_serve.py."""

import json
import shutil
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

    def __init__(self, failures: int, status: int = 429, headers: dict | None = None):
        self.failures, self.status, self.calls, self.bodies = failures, status, 0, []
        self.headers = {"Retry-After": "0.01", **(headers or {})}

    async def completions(self, request):
        self.calls += 1
        self.bodies.append(await request.json())
        if self.calls <= self.failures:
            return web.Response(status=self.status, text="slow down", headers=self.headers)
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
    # a 504 that says a retry would fail the same way (reinstruct's generator past its request budget)
    with _ScriptedServer(failures=100, status=504, headers={"x-should-retry": "false"}) as server:
        engine = create_engine("openai", base_url=f"http://127.0.0.1:{server.port}/v1", backoff_s=0.001)
        engine.load("m")
        with pytest.raises(OpenAIError, match="504"):
            engine.generate(["a"], SamplingParams())
    assert server.calls == 1


def _checkpoint_copy(source: str, target, **config_changes) -> str:
    """A checkpoint directory beside `source`: its files, config.json changed by `config_changes`."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return str(target)


def test_vllm_gpu_path_against_stand_in(monkeypatch, builtin_cache, tmp_path):
    """GPU only, so against a stand-in `vllm` (generation itself runs for real on the CPU build): the
    GPU options (memory share, sleep mode, tensor parallelism, CUDA graphs); a new round's checkpoint
    of the same shape reloaded in place (sleep level 2, wake the weights, reload_weights, wake the KV
    cache, reset the prefix cache); a model of another shape gets a new engine after the old one
    sleeps and shuts down."""
    from services.common.engines import vllm as vllm_engine
    from services.common.models import ensure_builtin

    built, calls = [], []

    class LLMStub:
        def __init__(self, model, **options):
            built.append((model, options))
            self.model = model
            self.llm_engine = types.SimpleNamespace(
                engine_core=types.SimpleNamespace(shutdown=lambda: calls.append(("shutdown", model)))
            )

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags=None):
            calls.append(("wake_up", tuple(tags)))

        def collective_rpc(self, method, kwargs=None):
            calls.append((method, kwargs["weights_path"]))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLMStub, SamplingParams=dict))
    monkeypatch.setattr(vllm_engine, "is_cpu_platform", lambda: False)
    model_0 = ensure_builtin("tiny-llama", builtin_cache)
    model_1 = _checkpoint_copy(model_0, tmp_path / "round-1", transformers_version="0.0.0")  # same shape
    other = _checkpoint_copy(model_0, tmp_path / "other", num_hidden_layers=2)
    engine = create_engine("vllm", cache_dir=builtin_cache, gpu_memory_utilization=0.5, tensor_parallel_size=2)
    engine.load(model_0)
    engine.load(model_0)  # the current model: nothing happens
    options = built[0][1]
    assert options["gpu_memory_utilization"] == 0.5 and options["enable_sleep_mode"] is True
    assert options["tensor_parallel_size"] == 2 and options["enforce_eager"] is False
    assert "kv_cache_memory_bytes" not in options and options["load_format"] == "safetensors"
    engine.load(model_1)
    assert len(built) == 1 and engine.model_uri == model_1
    assert calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("reload_weights", model_1),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
    ]
    calls.clear()
    engine.load(other)
    assert [m for m, _ in built] == [model_0, other]
    assert calls == [("sleep", 2), ("shutdown", model_0)]


def test_vllm_on_cpu_reserves_its_threads_and_kv_cache_in_ray():
    """vLLM's engine allocates its KV cache at start and computes on its own threads for the replica's
    life: a CPU replica reserves both, so Ray never places a second one on cores or memory in use."""
    from services.common.config import engine_options, parse_config, replica_options

    cpu = parse_config({"generation": {"engine": "vllm", "vllm_cpu_threads": 2, "vllm_cpu_kv_cache_bytes": 1 << 29}})
    for app in ("generator", "evaluator"):
        assert replica_options(cpu, app)["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0, "memory": 1 << 29}
    assert replica_options(cpu, "filter")["ray_actor_options"]["num_cpus"] == cpu.serve.replica_num_cpus
    assert engine_options(cpu)["cpu_threads"] == 2 and engine_options(cpu)["cpu_kv_cache_bytes"] == 1 << 29
    gpu = parse_config({"generation": {"engine": "vllm", "num_gpus": 1}})  # the KV cache is on the GPU
    assert replica_options(gpu, "generator", num_gpus=1)["ray_actor_options"] == {
        "num_cpus": gpu.serve.replica_num_cpus,
        "num_gpus": 1,
    }
    hf = parse_config({})
    assert "memory" not in replica_options(hf, "generator")["ray_actor_options"]


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
