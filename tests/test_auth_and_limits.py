"""Bearer-token auth on every gRPC method and on the OpenAI HTTP API, and oversized requests: a real
local cluster whose replicas have REINSTRUCT_API_TOKEN in their environment (the filter and
generator apps only, to keep it quick)."""

import json
import os
import time
import urllib.error
import urllib.request

import grpc
import pytest

from services.api import filter_pb2, filter_pb2_grpc
from services.client import ServiceClients
from services.common.config import parse_config
from services.common.convert import tasks_to_source
from services.common.formats import load_seed_tasks
from services.common.grpc_handler import API_TOKEN_ENV
from tests.tiny import tiny_settings

pytestmark = pytest.mark.ray
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory, builtin_cache):
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.api import SERVICER_FUNCTIONS
    from services.filter.deployment import build_app as build_filter
    from services.generator.deployment import build_app as build_generator

    settings = tiny_settings(str(tmp_path_factory.mktemp("store")), builtin_cache, 9400, 8400)
    settings["serve"].update(max_ongoing_requests=1, max_queued_requests=1)  # overload comes quickly
    config = parse_config(settings)
    os.environ[API_TOKEN_ENV] = TOKEN  # the local cluster's processes inherit it
    try:
        from services.serving import limit_proxy_messages, wait_for_previous_cluster

        wait_for_previous_cluster()  # a killed cluster's agent may still hold its port
        limit_proxy_messages()  # what `reinstruct serve` / `run` do before starting a local cluster
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(
            http_options=HTTPOptions(port=8400),
            grpc_options=gRPCOptions(port=9400, grpc_servicer_functions=SERVICER_FUNCTIONS),
        )
        args = {"settings": config.model_dump()}
        serve.run(build_filter(args), name="filter", route_prefix="/filter")
        serve.run(build_generator(args), name="generator", route_prefix="/generator")
        yield config
    finally:
        os.environ.pop(API_TOKEN_ENV, None)
        serve.shutdown()
        ray.shutdown()


def _request(n: int = 3):
    from services.api import common_pb2

    return filter_pb2.FilterTasksRequest(
        context=common_pb2.RunContext(run_id="auth", round=1), candidates=tasks_to_source(load_seed_tasks()[:n])
    )


def test_grpc_calls_need_the_token(secured):
    channel = grpc.insecure_channel("127.0.0.1:9400")
    stub = filter_pb2_grpc.FilterStub(channel)
    for metadata in ((("application", "filter"),), (("application", "filter"), ("authorization", "Bearer wrong"))):
        with pytest.raises(grpc.RpcError) as info:
            stub.FilterTasks(_request(), metadata=metadata, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ServiceClients("127.0.0.1:9400", 60, token=TOKEN).filter_tasks(_request()).candidates == 3
    channel.close()


def _oversized(tasks: int, chars: int):
    request = _request(1)
    for i in range(tasks):
        task = request.candidates.inline.tasks.add()
        task.id, task.instruction = f"big{i}", "x " * (chars // 2)
    return request


def test_oversized_request_is_resource_exhausted(secured, monkeypatch):
    clients = ServiceClients("127.0.0.1:9400", 60, token=TOKEN)
    # ~70 MiB, past the proxy's limit (65 MiB): refused by Serve's proxy before it reads the message
    with pytest.raises(grpc.RpcError) as info:
        clients.filter_tasks(_oversized(4000, 18_000))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    # ~64.4 MiB: through the proxy, then the replica's own limit (64 MiB) names what to do
    with pytest.raises(grpc.RpcError) as info:
        clients.filter_tasks(_oversized(3700, 18_250))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is" in info.value.details() and "dataset uri" in info.value.details()
    assert clients.filter_tasks(_request()).candidates == 3  # and it keeps serving


def test_openai_http_api_needs_the_token(secured):
    url = "http://127.0.0.1:8400/generator/v1/models"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=60)
    assert info.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["object"] == "list"


def test_the_openai_endpoint_checks_the_token_and_size_before_reading_the_body(secured):
    """Through Serve's HTTP proxy: a body over 8 MiB is refused (401 without the token, 413 with it, or
    the connection closed under a client still sending), a stop list over OpenAI's 4 or a stream
    request is 422, and the replica answers the next request at once. (That the body is never read
    or parsed: tests/test_openai_admission.py.)"""
    url = "http://127.0.0.1:8400/generator/v1/completions"
    body = json.dumps({"prompt": "x" * (8 * 2**20 + 1024)}).encode()
    token = {"Authorization": f"Bearer {TOKEN}"}
    for headers, status in (({}, 401), (token, 413)):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
        # the replica answers before it reads the body; Serve's proxy may then close the connection
        # while the client is still sending, which the client sees as a reset instead of the status
        with pytest.raises((urllib.error.HTTPError, urllib.error.URLError, ConnectionError)) as info:
            urllib.request.urlopen(request, timeout=60)
        if isinstance(info.value, urllib.error.HTTPError):
            assert info.value.code == status
    for payload, field in (
        ({"prompt": "x", "stop": list("abcde")}, "stop"),
        ({"prompt": "x", "stream": True}, "stream"),
    ):
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json", **token}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 422 and field in info.value.read().decode()
    request = urllib.request.Request("http://127.0.0.1:8400/generator/v1/models", headers=token)
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["object"] == "list"


def test_overload_is_refused_quickly(secured):
    """Past max_ongoing_requests + max_queued_requests, callers get RESOURCE_EXHAUSTED at once."""
    import threading

    from services.api import common_pb2, generator_pb2

    clients = ServiceClients("127.0.0.1:9400", 120, token=TOKEN, retries=0)
    request = generator_pb2.GenerateInstructionsRequest(
        context=common_pb2.RunContext(run_id="overload", round=1),
        model_uri="builtin:tiny-llama",
        seed_tasks=tasks_to_source(load_seed_tasks()[:20]),
        num_prompts=16,
        num_human_in_context=6,
        sampling=common_pb2.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=256, seed=1),
    )
    outcomes, lock = [], threading.Lock()

    def call():
        started = time.time()
        try:
            clients.generate_instructions(request)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            outcomes.append((code, time.time() - started))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join(600)
    refused = [seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED"]
    assert len(outcomes) == 6 and len(refused) >= 3, outcomes
    assert max(refused) < 5.0  # refused at once, not after waiting
    assert [code for code, _ in outcomes].count("OK") >= 1


class _Failure(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_the_client_retries_failures_around_a_replica_not_its_answers():
    """Whether a call is retried depends on who answered, never on the words of the message: an
    INTERNAL that a replica chose (its handler marks every status) is final, even if it says
    "unexpectedly"; an INTERNAL without the mark (Serve's proxy, the replica died) is retried."""
    from services.client import _retryable
    from services.common.grpc_handler import ANSWERED_KEY

    answered = ((ANSWERED_KEY, "INTERNAL"),)
    assert not _retryable(_Failure(grpc.StatusCode.INTERNAL, "ValueError: the file ended unexpectedly", answered))
    assert _retryable(_Failure(grpc.StatusCode.INTERNAL, "Unexpected error", (("request_id", "x"),)))
    assert _retryable(_Failure(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert not _retryable(_Failure(grpc.StatusCode.INVALID_ARGUMENT, "seeds: empty"))
