"""Work nobody waits for stops: a request that runs past serve.request_timeout_s (the longest any
client waits) ends with DEADLINE_EXCEEDED between or inside generation batches, and the replica
answers the next request at once. The real generator deployment class and hf engine, in-process."""

import time

import pytest

from services.api import common_pb2, generator_pb2
from services.common.convert import tasks_to_source
from services.common.formats import load_seed_tasks
from services.generator import deployment as generator_deployment


def _request(prompts: int, tokens: int = 256) -> generator_pb2.GenerateInstructionsRequest:
    return generator_pb2.GenerateInstructionsRequest(
        context=common_pb2.RunContext(run_id="r", round=1),
        model_uri="builtin:tiny-llama",
        seed_tasks=tasks_to_source(load_seed_tasks()[:8]),
        num_prompts=prompts,
        num_human_in_context=2,
        sampling=common_pb2.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=tokens, seed=1),
    )


def test_a_request_past_its_budget_stops_and_frees_the_replica(tmp_path, builtin_cache):
    generator_class = generator_deployment.GeneratorDeployment.func_or_class.__mro__[1]  # no ASGI app
    settings = {
        "model": {"base": "builtin:tiny-llama", "builtin_cache_dir": builtin_cache},
        "store": {"root": str(tmp_path)},
        "serve": {"request_timeout_s": 5},
        "generation": {"batch_size": 4},
    }
    replica = generator_class(settings)
    replica.GenerateInstructions(_request(1, tokens=4))  # the model loads outside the measured request
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="DEADLINE_EXCEEDED.*request_timeout_s"):
        replica.GenerateInstructions(_request(2000))  # 500 batches of 256 tokens: many minutes of work
    assert time.monotonic() - started < 5 + 15  # stopped at the budget (plus at most a model step)
    answer = replica.GenerateInstructions(_request(2, tokens=4))  # the replica is free, the lock released
    assert answer.prompts == 2
