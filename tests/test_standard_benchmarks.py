"""Standard benchmarks through lm-evaluation-harness, for real (no mocks, no Ray): the shipped
reinstruct_ifformat task's checking code, lm-eval's HF adapter on the tiny preset and on SmolLM2, a
user's own task YAML with local data, the one-line error for data that cannot be fetched, RunBenchmarks
on the evaluator deployment in-process, the test stage of a whole (scripted) run, the report and MLflow's
keys. The same RPC through Serve's gRPC proxy: tests/test_e2e_grpc.py."""

import importlib.util
import inspect
import json
import os
import shutil
import time

import pytest

if importlib.util.find_spec("lm_eval") is None and not os.environ.get("CI"):  # CI has it: make setup installs it
    pytest.skip("the benchmarks extra is not installed: pip install 'reinstruct[benchmarks]'", allow_module_level=True)

from ray_jobs import manifest as stage_records  # noqa: E402  (a class named Test* imported here would be collected)
from services.common.config import parse_config  # noqa: E402
from services.common.store import RunStore  # noqa: E402
from services.common.validation import RequestError  # noqa: E402
from services.evaluator import standard_benchmarks as sb  # noqa: E402
from services.evaluator.benchmark_tasks.reinstruct_ifformat import checks  # noqa: E402

SHIPPED = "reinstruct_ifformat"
# what a replica passes from its config (evaluation.bootstrap_resamples, generation.batch_size, smaller;
# evaluation.benchmark_downloads)
RUN = {"batch_size": 4, "bootstrap_iters": 100, "allow_downloads": False}


# ---- the shipped task's checking code ------------------------------------------------------------
PASS_FAIL = [
    ({"kind": "lowercase"}, "all quiet on the moon.", "All quiet on the moon."),
    ({"kind": "uppercase"}, "CAUTION: WET FLOOR!", "CAUTION: wet floor!"),
    ({"kind": "bullets", "n": 3}, "* one\n* two\n- three", "* one\n* two"),
    ({"kind": "bullets", "n": 2}, "Here:\n* a\n* b", "* a\n* b\n* c"),
    ({"kind": "numbered", "n": 3}, "1. a\n2. b\n3) c", "1. a\n2. b"),
    ({"kind": "paragraphs", "n": 2}, "First part.\n\nSecond part.", "One part only."),
    ({"kind": "include", "word": "shell"}, "A hard Shell.", "Seashells everywhere."),
    ({"kind": "exclude", "word": "water"}, "Waves and salt.", "Salt WATER."),
    ({"kind": "keyword_count", "word": "listen", "n": 2}, "Listen first, then listen again.", "Listen once."),
    ({"kind": "starts_with", "phrase": "Dear customer"}, '"Dear customer, sorry."', "Hello dear customer"),
    ({"kind": "ends_with", "phrase": "See you soon."}, "Bring food. see you soon.", "See you soon. Bye."),
    ({"kind": "no_commas"}, "Blue light scatters most", "Blue, mostly"),
    ({"kind": "max_words", "n": 3}, "Read every day.", "Read a little every day."),
    ({"kind": "min_words", "n": 4}, "one two three four", "one two three"),
    ({"kind": "json"}, '```json\n{"title": "Dune", "author": "Herbert"}\n```', "title: Dune"),
    ({"kind": "quoted"}, '"Ride further."', "Ride further."),
    ({"kind": "title"}, "<<Rain>>\nDrops fall.", "Rain\nDrops fall."),
    # near misses: a longer word is not the phrase, an email's line break is a space, a lone "-" line
    # is no bullet, an empty object lacks the keys asked for
    ({"kind": "starts_with", "phrase": "The"}, "The sun rose.", "There are three."),
    ({"kind": "ends_with", "phrase": "Best regards, Sam"}, "Thanks again.\n\nBest regards,\nSam", "Best regards"),
    ({"kind": "bullets", "n": 1}, "- one", "-\none"),
    ({"kind": "json", "keys": ["title", "author"]}, '{"title": "Dune", "author": "Herbert"}', "{}"),
]


@pytest.mark.parametrize(
    "check,right,wrong", PASS_FAIL, ids=[f"{c['kind']}-{i}" for i, (c, _, _) in enumerate(PASS_FAIL)]
)
def test_each_check_passes_a_right_answer_and_fails_a_wrong_one(check, right, wrong):
    assert checks.passes(check, right)
    assert not checks.passes(check, wrong)
    assert not checks.passes(check, "   ")  # an empty answer passes nothing


def test_every_check_kind_is_tested_and_scores_combine():
    assert {c["kind"] for c, _, _ in PASS_FAIL} == set(checks.CHECKS)
    two = [{"kind": "lowercase"}, {"kind": "no_commas"}]
    assert checks.score(two, "no commas here") == {"prompt_acc": 1.0, "check_acc": 1.0}
    assert checks.score(two, "no commas, here") == {"prompt_acc": 0.0, "check_acc": 0.5}
    doc = {"checks": json.dumps(two)}
    assert checks.process_results(doc, ["Yes, Sir"]) == {"prompt_acc": 0.0, "check_acc": 0.0}


def test_the_shipped_prompts_are_varied_and_well_formed():
    prompts = checks.load_prompts()
    assert 40 <= len(prompts) <= 60 and len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    kinds = {c["kind"] for p in prompts for c in p["checks"]}
    assert kinds == set(checks.CHECKS)  # every kind of check is asked for at least once
    for p in prompts:
        assert p["checks"], p["id"]
        for c in p["checks"]:  # arguments match what the check takes
            params = list(inspect.signature(checks.CHECKS[c["kind"]]).parameters)[1:]
            assert sorted(params) == sorted(k for k in c if k != "kind"), (p["id"], c)
    data = checks.load_dataset(version=1.0)["test"]
    assert len(data) == len(prompts) and json.loads(data[0]["checks"]) == prompts[0]["checks"]


# ---- real lm-eval -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(builtin_cache) -> str:
    from services.common.models import ensure_builtin

    return ensure_builtin("tiny-llama", builtin_cache)


def _metric(task: sb.TaskScores, name: str) -> sb.Metric:
    return next(m for m in task.metrics if m.name == name)


def test_the_shipped_task_runs_on_the_tiny_model(tiny):
    results = sb.run_benchmarks(tiny, [SHIPPED], limit=3, **RUN)
    (task,) = results.tasks
    assert task.task == SHIPPED and task.samples == 3 and task.source == "reinstruct" and task.version == "1.0"
    for name in ("prompt_acc", "check_acc"):
        metric = _metric(task, name)
        assert 0.0 <= metric.value <= 1.0 and metric.stderr is not None and metric.stderr >= 0
        assert metric.higher_is_better is True
    assert results.lm_eval_version == "0.4.13" and results.limit == 3
    assert results.prompt_style == "plain"  # the tiny tokenizer has no chat template


def _user_task(directory, name="my_capitals") -> str:
    """A multiple-choice task of the user's: a task YAML and a JSONL file beside it (relative path)."""
    (directory / "data").mkdir(parents=True)
    rows = [
        {"q": "What is the capital of France?", "choices": ["Paris", "Rome", "Oslo"], "label": 0},
        {"q": "What is the capital of Italy?", "choices": ["Madrid", "Rome", "Bern"], "label": 1},
        {"q": "What is the capital of Norway?", "choices": ["Oslo", "Lima", "Kyiv"], "label": 0},
        {"q": "What is the capital of Peru?", "choices": ["Quito", "Bogota", "Lima"], "label": 2},
    ]
    (directory / "data" / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: data/capitals.jsonl\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 2.0\n"
    )
    return str(path)


def test_a_plain_model_gets_the_prompt_and_stops_the_evaluator_gives_it(tiny):
    """No chat template: lm-eval alone would send the bare instruction and stop nowhere; the model sees
    the evaluation template with the seed tag and stops where the template's next part starts."""
    from lm_eval.api.instance import Instance as Request

    from services.common import prompts
    from services.common.models import load_model
    from services.common.records import Instance, TaskRecord
    from services.common.rendering import Renderer

    _, tokenizer = load_model(tiny)
    renderer = Renderer.for_tokenizer(tokenizer, "auto", seed_tag="### Seed")
    request = Request("generate_until", {}, ("Name a colour.", {"until": ["\n\n\n"]}), 0, ("t", 0, 1))
    rendered = sb._rendered(request, renderer)
    context, kwargs = rendered.args
    expected = renderer.render(TaskRecord(id="x", instruction="Name a colour."), Instance("", "")).prompt
    assert context == expected and context.startswith("### Seed\n") and context != "Name a colour."
    assert kwargs["until"] == ["\n\n\n", *prompts.PLAIN_ANSWER_ENDS]
    assert (rendered.task_name, rendered.doc_id) == ("t", 0) and request.args[0] == "Name a colour."


def test_a_users_task_yaml_with_local_data_runs_wherever_the_replica_runs(tiny, tmp_path, monkeypatch):
    task_file = _user_task(tmp_path / "tasks")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the data path is relative to the YAML file, not to the working directory
    results = sb.run_benchmarks(tiny, [task_file, SHIPPED], limit=2, allowed_files=[task_file], **RUN)
    by_name = {t.task: t for t in results.tasks}
    assert set(by_name) == {"my_capitals", SHIPPED}
    acc = _metric(by_name["my_capitals"], "acc")
    assert acc.value in (0.0, 0.5, 1.0) and acc.stderr is not None
    assert by_name["my_capitals"].source == str((tmp_path / "tasks" / "my_capitals.yaml").resolve())
    assert by_name["my_capitals"].samples == 2 and by_name["my_capitals"].version == "2.0"


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    """Offline, with empty Hugging Face caches: nothing from the Hub is local (as on a fresh machine)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_a_task_whose_data_needs_the_hub_fails_in_one_line_at_once(empty_hf_cache):
    resolved = sb.resolve_tasks(["ifeval"])  # lm-eval's built-in IFEval (google/IFEval on the Hub)
    assert resolved[0].source == "lm-eval"
    started = time.monotonic()
    with pytest.raises(sb.BenchmarkUnavailable) as info:
        sb.check_tasks(resolved, allow_downloads=False)
    message = str(info.value)
    assert "\n" not in message and "'ifeval'" in message and "google/IFEval" in message, message
    assert "Hugging Face Hub" in message and "benchmark_downloads" in message
    assert time.monotonic() - started < 20  # no retries against a host it cannot reach
    # the same from run_benchmarks, before any model is loaded
    with pytest.raises(sb.BenchmarkUnavailable, match="google/IFEval"):
        sb.run_benchmarks("no-such-model-is-loaded", resolved, **RUN)


def test_a_local_task_with_a_missing_data_file_says_which(tmp_path):
    task_file = _user_task(tmp_path)
    (tmp_path / "data" / "capitals.jsonl").unlink()
    with pytest.raises(sb.BenchmarkUnavailable) as info:
        sb.check_tasks(sb.resolve_tasks([task_file]), allow_downloads=False)
    assert "\n" not in str(info.value) and "my_capitals" in str(info.value)


def test_unknown_tasks_and_files_not_listed_are_refused_naming_the_field(tmp_path):
    with pytest.raises(RequestError, match=r"tasks\[1\]: 'hellaswagg' is no lm-eval task.*hellaswag"):
        sb.resolve_tasks([SHIPPED, "hellaswagg"])
    task_file = _user_task(tmp_path)
    with pytest.raises(RequestError, match=r"tasks\[0\]: .*only the files the replica's evaluation.benchmarks"):
        sb.resolve_tasks([task_file], allowed_files=[])
    with pytest.raises(RequestError, match=r"tasks\[0\]: no task file"):
        sb.resolve_tasks([str(tmp_path / "missing.yaml")])
    with pytest.raises(RequestError, match=r"tasks\[1\]: task 'reinstruct_ifformat' is named twice"):
        sb.resolve_tasks([SHIPPED, SHIPPED])
    with pytest.raises(RequestError, match="executes code the model writes"):
        sb.resolve_tasks(["humaneval"])
    # a group of such tasks is refused before anything runs, naming the task that would run code
    with pytest.raises(RequestError, match=r"tasks\[0\]: 'humaneval_infilling' \(its task 'humaneval_.*infilling"):
        sb.resolve_tasks(["humaneval_infilling"])
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(RequestError, match=r"tasks\[0\]: .*no valid lm-eval task file"):
        sb.resolve_tasks([str(tmp_path / "broken.yaml")])


def test_smollm2_sees_the_chat_template_every_stage_renders(smollm2):
    """A chat model: lm-eval's apply_chat_template gives the prompt, and the token ids, that reinstruct's
    renderer gives the same instruction (services/common/rendering.py), system prompt included."""
    from services.common.models import load_model
    from services.common.records import Instance, TaskRecord
    from services.common.rendering import Renderer, encode_prompt

    model, tokenizer = load_model(smollm2)
    lm = sb._adapter(None)(pretrained=model, tokenizer=tokenizer, batch_size=1)
    prompt = checks.load_prompts()[0]["prompt"]
    for tag in ("", "Answer in the style of an AI Assistant."):
        renderer = Renderer.for_tokenizer(tokenizer, "auto", seed_tag=tag)
        assert renderer.style == "chat"
        ours = renderer.render(TaskRecord(id="t", instruction=prompt), Instance("", "")).prompt
        history = ([{"role": "system", "content": tag}] if tag else []) + [{"role": "user", "content": prompt}]
        theirs = lm.apply_chat_template(history)
        assert theirs == ours
        assert lm.tok_encode(theirs) == encode_prompt(tokenizer, ours)
        # the ids generation gets (tok_batch_encode; tok_encode only sorts requests)
        assert lm.tok_batch_encode([theirs])[0][0].tolist() == encode_prompt(tokenizer, ours)


@pytest.mark.vllm
def test_the_vllm_adapter_runs_on_the_replicas_engine_as_hflm_does(smollm2, builtin_cache):
    """generation.engine vllm: lm-eval's vLLM adapter on the evaluator's own engine (no second engine),
    the chat template every stage renders, and in float32 the same scores as HFLM on the same examples."""
    from tests.vllm_engines import AVAILABLE, vllm_engine

    if not AVAILABLE:
        pytest.skip("vLLM is not installed here: `make test` runs this in .venv-vllm")
    from services.common.records import Instance, TaskRecord
    from services.common.rendering import Renderer, encode_prompt

    engine = vllm_engine(smollm2, builtin_cache)
    lm = sb._vllm_adapter(engine, smollm2, None, batch_size=4)
    assert lm.model is engine.llm
    prompt = checks.load_prompts()[0]["prompt"]
    renderer = Renderer.for_tokenizer(engine.tokenizer, "auto")
    ours = renderer.render(TaskRecord(id="t", instruction=prompt), Instance("", "")).prompt
    theirs = lm.apply_chat_template([{"role": "user", "content": prompt}])
    assert theirs == ours and lm.tok_encode(theirs) == encode_prompt(engine.tokenizer, ours)

    common = dict(limit=6, allow_downloads=False, batch_size=4, bootstrap_iters=0, cache_dir=builtin_cache)
    by_vllm = sb.run_benchmarks(smollm2, [SHIPPED], engine=engine, **common)
    by_hf = sb.run_benchmarks(smollm2, [SHIPPED], **common)
    assert (by_vllm.adapter, by_hf.adapter) == ("vllm", "hf")
    assert by_vllm.prompt_style == by_hf.prompt_style == "chat"
    values = lambda r: {(t.task, m.name): m.value for t in r.tasks for m in t.metrics}  # noqa: E731
    assert values(by_vllm) == values(by_hf) and values(by_vllm)


@pytest.mark.slow
def test_smollm2_on_the_shipped_task(smollm2):
    """The real default model, two prompts (the whole task, 52 prompts, takes minutes on 2 cores): about
    a minute and a half on a busy 2-core machine, so marked slow."""
    results = sb.run_benchmarks(smollm2, [SHIPPED], limit=2, **{**RUN, "batch_size": 2})
    assert results.prompt_style == "chat"
    (task,) = results.tasks
    assert task.samples == 2 and all(0.0 <= m.value <= 1.0 and m.stderr is not None for m in task.metrics)


# ---- RunBenchmarks on the evaluator deployment, in-process ---------------------------------------------
@pytest.fixture(scope="module")
def evaluator(tmp_path_factory, builtin_cache):
    from services.evaluator.deployment import EvaluatorDeployment
    from tests.tiny import tiny_settings

    root = tmp_path_factory.mktemp("store")
    task_file = _user_task(tmp_path_factory.mktemp("tasks"))
    settings = tiny_settings(str(root), builtin_cache)
    settings["evaluation"].update(benchmarks=[SHIPPED, task_file], benchmark_limit=2)
    return EvaluatorDeployment.func_or_class(parse_config(settings).model_dump()), task_file


def _request(**fields):
    from services.api import common_pb2, evaluator_pb2

    fields.setdefault("context", common_pb2.RunContext(run_id="bench", round=1))
    return evaluator_pb2.RunBenchmarksRequest(**fields)


def test_run_benchmarks_answers_through_the_deployment(evaluator):
    deployment, task_file = evaluator
    response = deployment.RunBenchmarks(_request(model_uri="builtin:tiny-llama", tasks=[SHIPPED, task_file]))
    assert [t.task for t in response.tasks] == [SHIPPED, "my_capitals"]
    assert response.limit == 2 and response.lm_eval_version == "0.4.13" and response.prompt_style == "plain"
    for task in response.tasks:
        assert task.samples == 2 and task.metrics
        assert all(0.0 <= m.value <= 1.0 and m.HasField("stderr") for m in task.metrics)
    checked = deployment.RunBenchmarks(_request(tasks=[SHIPPED], validate_only=True))
    assert [(t.task, t.source, len(t.metrics)) for t in checked.tasks] == [(SHIPPED, "reinstruct", 0)]


@pytest.mark.parametrize(
    "fields,answer",
    [
        (dict(model_uri="builtin:tiny-llama", tasks=[SHIPPED], limit=-1), "INVALID_ARGUMENT: limit"),
        (dict(model_uri="builtin:tiny-llama", tasks=["no_such_task"]), "INVALID_ARGUMENT: tasks[0]"),
        (dict(model_uri="builtin:tiny-llama", tasks=[]), "INVALID_ARGUMENT: tasks"),
        (dict(model_uri="/etc", tasks=[SHIPPED]), "INVALID_ARGUMENT: model_uri"),
        (dict(model_uri="org/hub-model", tasks=[SHIPPED]), "INVALID_ARGUMENT: model_uri"),
        (dict(tasks=[SHIPPED]), "INVALID_ARGUMENT: model_uri"),
        (dict(model_uri="builtin:tiny-llama", tasks=["/etc/some_task.yaml"]), "INVALID_ARGUMENT: tasks[0]"),
        (dict(model_uri="builtin:tiny-llama", tasks=["ifeval"], validate_only=True), "FAILED_PRECONDITION"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(evaluator, fields, answer, empty_hf_cache):
    deployment, _ = evaluator
    with pytest.raises(RuntimeError) as info:
        deployment.RunBenchmarks(_request(**fields))
    assert str(info.value).startswith(answer), str(info.value)


# ---- the test stage of a run, the report and MLflow's keys ---------------------------------------
def test_the_test_stage_benchmarks_model_0_the_control_and_the_final_model(tmp_path, monkeypatch, builtin_cache, tiny):
    """The loop (scripted answers, a trainer that writes real tiny checkpoints) with evaluation.benchmarks:
    checked before round 0, run in the test stage on each model, in the manifest and the report."""
    from ray_jobs.report import build_report
    from ray_jobs.self_improve import LoopDriver
    from tests.test_driver import InProcessClients, ScriptedEngine, _settings

    class Clients(InProcessClients):
        def __init__(self, *args):
            super().__init__(*args)
            self.benchmark_requests = []

        def wait_for_training(self, request, poll_s=0.0, on_progress=None, stall_timeout_s=0.0):
            status = super().wait_for_training(request, poll_s, on_progress, stall_timeout_s)
            shutil.copytree(tiny, self.store.resolve(request.output_model_uri), dirs_exist_ok=True)
            return status

        def run_benchmarks(self, request):
            self.benchmark_requests.append(request)
            return self.evaluator.RunBenchmarks(request)

    settings = _settings(str(tmp_path / "store"))
    settings["model"] = {"base": "builtin:tiny-llama", "builtin_cache_dir": builtin_cache}
    settings["loop"] = {"rounds": 1}
    settings["evaluation"] = {"benchmarks": [SHIPPED], "benchmark_limit": 2}
    clients = Clients(settings, ScriptedEngine(), monkeypatch)
    manifest = LoopDriver(parse_config(settings), clients, "r").run()
    assert manifest["status"] == "succeeded"
    assert clients.benchmark_requests[0].validate_only  # checked before any stage
    test = stage_records.Tested.from_dict(manifest["rounds"]["1"]["stages"]["test"])
    results = test.benchmark_results()
    assert {b.model for b in results} == {"model_0", "control", "final"}
    assert test.lm_eval_version == "0.4.13" and test.benchmark_limit == 2 and test.benchmark_prompt_style == "plain"
    by_model = {b.model: b for b in results}
    assert by_model["model_0"].model_uri == "builtin:tiny-llama"
    assert by_model["final"].model_uri == test.final_model and by_model["control"].model_uri == test.control_model
    for b in results:
        assert b.task == SHIPPED and b.samples == 2 and set(b.metrics) == set(b.stderrs) == {"prompt_acc", "check_acc"}
    # distinct models only: model 0, the control and the final model are three
    assert len([r for r in clients.benchmark_requests if not r.validate_only]) == 3
    from ray_jobs.cli import _test_line

    assert f"\n  benchmark {SHIPPED} prompt_acc: model_0 " in _test_line(manifest)  # the run's summary
    page = build_report(RunStore(settings["store"]["root"]), "r")
    section = page.split('<section id="benchmarks">')[1].split("</section>")[0]
    assert SHIPPED in section and "model 0" in section and "control (seeds only)" in section
    assert "(lm-evaluation-harness): model 0, control (seeds only) and final</h2>" in section
    assert (
        f"{by_model['final'].metrics['prompt_acc']:.4f} &plusmn; {by_model['final'].stderrs['prompt_acc']:.4f}"
        in section
    )


def _tested() -> stage_records.Tested:
    def bench(model, value):
        return stage_records.Benchmarked(
            model=model,
            model_uri=f"uri-{model}",
            task=SHIPPED,
            metrics={"prompt_acc": value, "check_acc": value + 0.1},
            stderrs={"prompt_acc": 0.05},
            higher_is_better={"prompt_acc": True, "check_acc": True},
            samples=52,
            version="1.0",
            source="reinstruct",
        ).to_dict()

    return stage_records.Tested(
        model_0="uri-model_0",
        final_model="uri-final",
        benchmarks=[bench("model_0", 0.25), bench("final", 0.5)],
        lm_eval_version="0.4.13",
        benchmark_prompt_style="chat",
    )


def test_the_report_shows_a_table_per_task_with_stderr(tmp_path):
    from ray_jobs.report import SECTIONS, build_report
    from tests.tiny import fill_example_run

    store = RunStore(str(tmp_path))
    fill_example_run(store)
    page = build_report(store, "r")
    assert "benchmarks" in SECTIONS and "No standard benchmarks" in page  # none in the example run
    store.commit_stage("r", 1, "test", _tested().to_dict())
    page = build_report(store, "r")
    section = page.split('<section id="benchmarks">')[1].split("</section>")[0]
    assert "<h3>reinstruct_ifformat (52 examples; reinstruct)</h3>" in section
    assert "<th>model 0</th><th>final</th>" in section and "control" not in section
    assert "Standard benchmarks (lm-evaluation-harness): model 0 and final</h2>" in section
    assert "<td>0.2500 &plusmn; 0.0500</td><td>0.5000 &plusmn; 0.0500</td>" in section
    assert "<td>0.3500</td><td>0.6000</td>" in section  # no stderr: the value alone
    assert "lm-evaluation-harness 0.4.13" in section and "rendered chat" in section


def test_mlflow_gets_benchmark_task_metric_model_keys():
    from ray_jobs.tracking import stage_values

    metrics, tags = stage_values("test", _tested())
    assert metrics["benchmark/reinstruct_ifformat/prompt_acc/model_0"] == 0.25
    assert metrics["benchmark/reinstruct_ifformat/prompt_acc/final"] == 0.5
    assert metrics["benchmark/reinstruct_ifformat/prompt_acc_stderr/final"] == 0.05
    assert metrics["benchmark/reinstruct_ifformat/check_acc/final"] == pytest.approx(0.6)
    assert "benchmark/reinstruct_ifformat/check_acc_stderr/final" not in metrics
    assert tags["test.lm_eval_version"] == "0.4.13"
    assert not any(k.startswith("test.benchmarks") for k in metrics)


def test_benchmark_settings_are_typed_config():
    config = parse_config({"evaluation": {"benchmarks": [SHIPPED], "benchmark_limit": 10}})
    assert config.evaluation.benchmarks == [SHIPPED] and not config.evaluation.benchmark_downloads
    assert parse_config({}).evaluation.benchmarks == []  # off by default: `make run` runs none
    for bad in ({"benchmark_limit": -1}, {"benchmarks": [SHIPPED, SHIPPED]}, {"benchmarks": [""]}):
        with pytest.raises(ValueError):
            parse_config({"evaluation": bad})


def test_a_run_waiting_for_another_gives_up_within_its_budget():
    """One benchmark run per replica at a time; a second request waits only as long as its budget."""
    from services.common import deadline

    with sb._RUN_LOCK, deadline.budget(0.3), pytest.raises(deadline.WorkAbandoned):
        started = time.monotonic()
        sb.check_tasks(sb.resolve_tasks([SHIPPED]), allow_downloads=False)
    assert time.monotonic() - started < 5
