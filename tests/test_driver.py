"""The loop driver without Ray: the real deployment classes answer in-process (no gRPC), the generator
and evaluator with a scripted engine, and a trainer that records its requests and writes a stub
checkpoint. Checks the round's method: the pool refresh within a round, greedy instances, rescoring
of every backtranslated pair, fine-tuning from the base model, the dev/test split and the test stage."""

import hashlib
import json
import os

import pytest

from ray_jobs.self_improve import LoopDriver
from services.api import trainer_pb2
from services.common.config import parse_config
from services.common.engines import Completion, ModelSessions
from services.common.formats import load_seed_tasks
from services.common.store import RunStore
from services.evaluator import deployment as evaluator_deployment
from services.filter.deployment import FilterDeployment
from services.generator import deployment as generator_deployment

REFERENCES = {t.instruction.strip(): t.instances[0].output.strip() for t in load_seed_tasks()}


def _number(prompt: str) -> int:
    """A number the prompt alone decides: answers do not depend on the order shards arrive in."""
    return int(hashlib.sha1(prompt.encode()).hexdigest()[:8], 16)


class ScriptedEngine(ModelSessions):
    """Answers every prompt kind the loop sends; trained models (round >= 1) answer held-out tasks right."""

    def __init__(self):
        self.model_uri, self.tokenizer, self.calls = None, None, []

    def load(self, model_uri):
        self.model_uri = model_uri

    def _answer(self, prompt: str) -> str:
        if prompt.startswith("Come up with a series of"):
            n = _number(prompt)
            return f" Write a limerick about the number {n}.\n10. Name {n + 1} rivers of Peru."
        if "Is it classification?" in prompt:
            return " No"
        if prompt.startswith(("Come up with examples", "Given the classification task")):
            return "Example 1\nOutput: an answer\nExample 2\nOutput: another answer\n"
        if prompt.startswith("Below is a response"):
            return f" Explain what passage number {_number(prompt)} of the documentation says."
        if "5-point scale" in prompt:
            return " A helpful answer.\nScore: 5"
        instruction = prompt.split("\n\n")[0].strip()
        return f" {REFERENCES.get(instruction, 'no idea')}" if self._trained() else " no idea"

    def _trained(self) -> bool:
        """A round's model (round-001/model, ...): not the base, the backward model or the seeds-only control."""
        uri = self.model_uri or ""
        return uri.endswith("/model") and "round-000" not in uri

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [Completion(self._answer(p), "stop") for p in prompts]

    def score_nll(self, prompts, responses, max_len=0):
        # trained models find references likelier; every model finds a seed response likelier after its own
        # instruction than after another (what the likelihood rater's control measures)
        own = [REFERENCES.get(p.split("\n\n")[0].strip()) == r.strip() for p, r in zip(prompts, responses)]
        return [(0.5 if self._trained() else 1.0) - 0.25 * o for o in own]


class InProcessClients:
    def __init__(self, settings: dict, engine, monkeypatch):
        # the class under serve.ingress's wrapper (whose __init__ starts the ASGI app); the wrapper holds a
        # copy of it, with globals of its own
        generator = generator_deployment.GeneratorDeployment.func_or_class.__mro__[1]
        monkeypatch.setitem(generator.__init__.__globals__, "create_engine", lambda name, **options: engine)
        monkeypatch.setattr(evaluator_deployment, "create_engine", lambda name, **options: engine)
        self.generator = generator(settings)
        self.filter = FilterDeployment.func_or_class(settings)
        self.evaluator = evaluator_deployment.EvaluatorDeployment.func_or_class(settings)
        self.store = RunStore(settings["store"]["root"])
        self.trainings = []

    def generate_instructions(self, request):
        return self.generator.GenerateInstructions(request)

    def classify_instructions(self, request):
        return self.generator.ClassifyInstructions(request)

    def generate_instances(self, request):
        return self.generator.GenerateInstances(request)

    def backtranslate(self, request):
        return self.generator.Backtranslate(request)

    def curate_examples(self, request):
        return self.generator.CurateExamples(request)

    def filter_tasks(self, request):
        return self.filter.FilterTasks(request)

    def score_novelty(self, request):
        return self.filter.ScoreNovelty(request)

    def stream_evaluation(self, request, on_progress=None):
        return self.evaluator.EvaluateModel(request)

    def compare_models(self, request):
        return self.evaluator.CompareModels(request)

    def decide_promotion(self, request):
        return self.evaluator.DecidePromotion(request)

    def wait_for_training(self, request, poll_s=0.0, on_progress=None, stall_timeout_s=0.0):
        self.trainings.append(request)
        path = self.store.resolve(request.output_model_uri)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as handle:
            json.dump({"stub": True}, handle)
        return trainer_pb2.TrainingStatus(
            job_id=f"fake-{len(self.trainings)}",
            state=trainer_pb2.TrainingStatus.SUCCEEDED,
            model_uri=request.output_model_uri,
            step=1,
            total_steps=1,
            loss=1.0,
            losses=[1.0],
            train_examples=1,
        )


def _settings(root: str, fanout: dict | None = None, **training) -> dict:
    return {
        "model": {"base": "scripted-base"},
        "store": {"root": root},
        "generation": {"num_prompts": 4, "pool_refresh_prompts": 2},
        "training": training,
        "backtranslation": {"segments_per_round": 3},
        "loop": {"rounds": 2},
        "fanout": fanout or {},
        "tracking": {"enabled": False},  # tests/test_tracking.py runs the tracker against a real server
    }


@pytest.fixture
def run(tmp_path, monkeypatch):
    def go(store: str = "store", fanout: dict | None = None, clients_class=None, **training):
        settings = _settings(str(tmp_path / store), fanout, **training)
        engine = ScriptedEngine()
        clients = (clients_class or InProcessClients)(settings, engine, monkeypatch)
        manifest = LoopDriver(parse_config(settings), clients, "r").run()
        return manifest, clients, engine

    return go


def test_a_round_follows_the_method(run):
    manifest, clients, engine = run()
    store, rounds = clients.store, manifest["rounds"]
    assert manifest["status"] == "succeeded"

    # the pool refresh: prompts 2-3 of round 1 show instructions that prompts 0-1 wrote
    written = store.read_tasks(rounds["1"]["stages"]["generate_instructions"]["uri"])
    ids = {w.id for w in written}
    first_half = [t for t in written if not set(t.lineage.context_task_ids) & ids]
    later = [t for t in written if set(t.lineage.context_task_ids) & ids]
    assert later and first_half, "later prompts of the round must see the round's earlier instructions"
    assert rounds["1"]["stages"]["generate_instructions"]["in_context_pool"] > 0

    # instances are decoded greedily with presence penalty 1.5; curation generates nothing (it reads the
    # model's probabilities) and its rater passed the round's control
    instance_params = [p for prompts, p in engine.calls if prompts[0].startswith("Come up with examples")]
    assert instance_params and all(p.temperature == 0.0 and p.presence_penalty == 1.5 for p in instance_params)
    assert not [p for prompts, p in engine.calls if "5-point scale" in prompts[0]]
    assert [rounds[k]["stages"]["curation_control"]["auc"] for k in "12"] == [1.0, 1.0]
    # every prompt's pass is bounded: the generator cuts prompts to generation.max_prompt_tokens, the
    # evaluator to training.max_seq_len (what training saw)
    generator_kinds = ("Come up with", "Given the classification task", "Below is a response")
    limits = {p.max_prompt_tokens for prompts, p in engine.calls if prompts[0].startswith(generator_kinds)}
    assert limits == {2048} and {p.max_prompt_tokens for _, p in engine.calls} == {2048, 384}

    # every round fine-tunes the base model; the backward model is trained once
    assert [t.base_model_uri for t in clients.trainings] == ["scripted-base"] * 4  # + the seeds-only control
    assert rounds["2"]["stages"]["train"]["base_model"] == "scripted-base"  # recorded in the manifest
    assert [rounds[k]["stages"]["filter_augmented"]["selection"] for k in "12"] == ["rank", "rank"]  # likelihood

    # rescoring: round 2 rates round 1's pairs again, and only its own ratings choose the kept set
    backtranslated = {k: {t.id for t in store.read_tasks(rounds[k]["stages"]["backtranslate"]["uri"])} for k in "12"}
    rated = {t.id for t in store.read_tasks(rounds["2"]["stages"]["rating_pool"]["uri"])}
    assert rated == backtranslated["1"] | backtranslated["2"] and len(rated) == 6
    mix = store.read_tasks(rounds["2"]["stages"]["train_data"]["uri"])
    assert rounds["2"]["stages"]["train_data"]["augmented"] == rounds["2"]["stages"]["filter_augmented"]["kept_count"]
    assert len([t for t in mix if t.lineage.stage == "backtranslate"]) == len(rated)  # all tie at the cut-off

    # the gate decides on dev; the test stage scores model 0 and the final model once on test
    split = rounds["0"]["stages"]["split"]
    assert not set(split["dev_task_ids"]) & set(split["test_task_ids"])
    assert rounds["0"]["stages"]["evaluate"]["model_uri"] == "scripted-base"
    assert rounds["1"]["stages"]["promote"]["promoted"] and not rounds["2"]["stages"]["promote"]["promoted"]
    test = rounds["2"]["stages"]["test"]
    assert test["model_0"] == "scripted-base" and test["final_model"] == manifest["final_model"]
    assert test["final_model"].endswith("round-001/model") and test["num_tasks"] == split["test_tasks"]
    assert test["final_score"] > test["model_0_score"] and test["difference"][1] > 0


def test_a_finished_run_reads_back_as_typed_results(run, tmp_path):
    """The summary table, `reinstruct status` and `reinstruct export` read the committed stages as
    their typed results: what they show is what the stages committed."""
    from typer.testing import CliRunner

    from ray_jobs.cli import app
    from ray_jobs.manifest import Filtered, Tested, rounds_of
    from ray_jobs.self_improve import summarize

    manifest, clients, _ = run()
    rows = summarize(manifest)
    stages = [manifest["rounds"][str(k)]["stages"] for k in range(3)]
    assert [r.round for r in rows] == [0, 1, 2] and rows[0].kept is None and rows[0].promoted is True
    assert [r.kept for r in rows[1:]] == [s["filter"]["kept_count"] for s in stages[1:]]
    assert [r.augmented_kept for r in rows[1:]] == [s["filter_augmented"]["kept_count"] for s in stages[1:]]
    assert [r.score for r in rows] == [s["evaluate"]["score"] for s in stages]
    assert rounds_of(manifest)[2].get("test", Tested).final_model == manifest["final_model"]
    with pytest.raises(TypeError, match="commits Filtered"):
        rounds_of(manifest)[1].get("filter", Tested)

    flags = ["--store-root", str(tmp_path / "store"), "--config", str(tmp_path / "none.yaml")]
    status = CliRunner().invoke(app, ["status", "r", *flags])
    assert status.exit_code == 0 and "r: succeeded" in status.output, status.output
    assert f"final model {stages[2]['test']['final_score']:.4f}" in status.output
    stop = CliRunner().invoke(app, ["stop", "r", *flags])  # a finished run has nothing to stop
    assert stop.exit_code == 1 and "is not running (succeeded): nothing to stop" in stop.output, stop.output
    for bad in ("..", "/etc", "a/b"):  # a run id that names no run: one line, no traceback
        out = CliRunner().invoke(app, ["status", bad, *flags])
        assert out.exit_code == 2 and "is no run id" in out.output and "Traceback" not in out.output, out.output

    exported = tmp_path / "kept.jsonl"
    result = CliRunner().invoke(app, ["export", "r", "-o", str(exported), *flags])
    assert result.exit_code == 0, result.output
    kept = [
        t
        for r in rounds_of(manifest)
        for n in ("filter", "filter_augmented")
        if (f := r.get(n, Filtered))
        for t in f.kept(clients.store)
    ]
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(kept) == sum(s[n]["kept_count"] for s in stages[1:] for n in ("filter", "filter_augmented")) > 0
    assert len(lines) >= len(kept)  # every kept task, each instance a line
    assert {line["instruction"] for line in lines} == {t.instruction for t in kept}


def test_continue_from_the_promoted_model(run):
    _, clients, _ = run(from_base=False)
    bases = [t.base_model_uri for t in clients.trainings]
    # the control, the backward model and round 1 start from the base; round 2 from round 1's model
    assert bases[:3] == ["scripted-base"] * 3 and bases[3].endswith("round-001/model")


def test_a_relative_store_inside_a_ray_job_package_is_refused(tmp_path, monkeypatch):
    from ray_jobs.self_improve import refuse_store_inside_job_package

    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    with pytest.raises(SystemExit, match="inside Ray's job package"):
        refuse_store_inside_job_package("./runs")
    refuse_store_inside_job_package(str(tmp_path / "runs"))  # absolute: one place for every process
    refuse_store_inside_job_package("s3://bucket/runs")
    monkeypatch.chdir(tmp_path)
    refuse_store_inside_job_package("./runs")  # a local run: ./runs is where the user is


SMALL_SHARDS = {"prompts_per_shard": 1, "tasks_per_shard": 1, "filter_candidates_per_shard": 1, "max_in_flight": 3}
DATASET_STAGES = ("generate_instructions", "classify", "generate_instances", "backtranslate", "curate")


def _stage_records(manifest: dict, store: RunStore) -> dict:
    """Every stage's records (id, instruction, instances), the filter's decisions and the scores."""
    out = {}
    for k in ("1", "2"):
        stages = manifest["rounds"][k]["stages"]
        for name in DATASET_STAGES:
            out[k, name] = [(t.id, t.instruction, t.instances) for t in store.read_tasks(stages[name]["uri"])]
        out[k, "kept"] = [t.id for t in store.read_tasks(stages["filter"]["kept_uri"])]
        out[k, "max_rouge_l"] = stages["filter"]["max_rouge_l"]
        out[k, "task_metrics"] = stages["evaluate"]["task_metrics"]
        out[k, "score"] = stages["evaluate"]["score"]
        out[k, "predictions"] = sorted(t.id for t in store.read_tasks(stages["evaluate"]["predictions_uri"]))
    return out


def test_the_shard_count_changes_nothing(run):
    """One request per stage, or one task / prompt / candidate per request, three at once: the same
    records, ids, filter decisions (the parallel ScoreNovelty part included) and scores."""
    whole, whole_clients, _ = run("whole")
    sharded, sharded_clients, _ = run("sharded", SMALL_SHARDS)
    stages = sharded["rounds"]["1"]["stages"]
    assert stages["classify"]["shards"] == stages["generate_instructions"]["count"] > 1
    assert stages["evaluate"]["shards"] == stages["evaluate"]["num_tasks"] > 1
    assert os.path.isdir(
        os.path.join(sharded_clients.store.root, "r", "round-001", "shards", "filter")
    )  # parallel part
    records = _stage_records(whole, whole_clients.store)
    assert records == _stage_records(sharded, sharded_clients.store)
    words = [m["rounds"]["1"]["stages"]["evaluate"]["answer_words"] for m in (whole, sharded)]
    assert words[0] == pytest.approx(words[1]) and words[0] > 0  # the shards' answer lengths combine too
    assert all(records[k, name] for k in "12" for name in DATASET_STAGES)
    for k in "12":
        ids = [r[0] for r in records[k, "generate_instances"]]
        assert len(ids) == len(set(ids))


class CrashingClients(InProcessClients):
    """The driver's process dies (an exception nobody catches) at the third instances request."""

    calls = 0

    def generate_instances(self, request):
        CrashingClients.calls += 1
        if CrashingClients.calls == 3:
            raise KeyboardInterrupt("killed")
        return super().generate_instances(request)


def test_a_crash_mid_stage_redoes_only_the_missing_shards(run):
    CrashingClients.calls = 0
    shards = {**SMALL_SHARDS, "max_in_flight": 1}
    whole, whole_clients, _ = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("crashed", shards, CrashingClients)
    assert CrashingClients.calls == 3
    store = RunStore(str(whole_clients.store.root).replace("whole", "crashed"))
    assert "generate_instances" not in store.load_manifest("r")["rounds"]["1"]["stages"]

    class CountingClients(InProcessClients):
        sent: list = []

        def generate_instances(self, request):
            CountingClients.sent.append(request.tasks.uri)
            return super().generate_instances(request)

    resumed, resumed_clients, _ = run("crashed", shards, CountingClients)
    round_1 = [u for u in CountingClients.sent if "round-001" in u]
    total = resumed["rounds"]["1"]["stages"]["generate_instances"]["shards"]
    assert len(round_1) == total - 2 and not any(
        u.endswith(("00000.input.parquet", "00001.input.parquet")) for u in round_1
    )
    assert _stage_records(resumed, resumed_clients.store) == _stage_records(whole, whole_clients.store)


def _continuous(tmp_path, monkeypatch, reporter=None, **loop):
    from ray_jobs.self_improve import Reporter

    settings = _settings(str(tmp_path / "store"))
    settings["loop"] = {"rounds": 0, **loop}
    clients = InProcessClients(settings, ScriptedEngine(), monkeypatch)
    _continuous.clients = clients
    return LoopDriver(parse_config(settings), clients, "r", reporter or Reporter()).run()


def test_a_continuous_run_stops_after_patience_rounds_without_promotion(tmp_path, monkeypatch):
    manifest = _continuous(tmp_path, monkeypatch, patience=2)
    rounds = manifest["rounds"]
    assert [rounds[k]["stages"]["promote"]["promoted"] for k in "123"] == [True, False, False] and "4" not in rounds
    assert manifest["stopped_because"] == "no promotion in 2 rounds in a row"
    assert manifest["promoted_model"] == manifest["final_model"] and manifest["final_model"].endswith("round-001/model")
    assert "test" in rounds["3"]["stages"]  # the honest number, after the last round

    # the OpenAI endpoint's model run:<id> is the run's latest promoted model (no restart, no new name)
    from fastapi import HTTPException

    generator = _continuous.clients.generator
    assert generator._openai_model("run:r") == manifest["promoted_model"]
    for name, status in (("run:nothing-here", 404), ("run:../r", 400), ("run:", 400)):
        with pytest.raises(HTTPException) as refused:
            generator._openai_model(name)
        assert refused.value.status_code == status, name


def test_a_continuous_run_can_be_stopped_and_resumed(tmp_path, monkeypatch):
    from ray_jobs.self_improve import Reporter

    store = RunStore(str(tmp_path / "store"))

    class StopAfterRoundOne(Reporter):  # `reinstruct stop r` while round 1 runs
        def stage_done(self, round_index, stage, output):
            if (round_index, stage) == (1, "train"):
                store.request_stop("r")

    stopped = _continuous(tmp_path, monkeypatch, StopAfterRoundOne(), patience=1)
    assert stopped["stopped_because"] == "stop requested" and sorted(stopped["rounds"]) == ["0", "1"]
    assert stopped["rounds"]["1"]["stages"]["promote"]["promoted"]  # the round in progress finished
    committed = stopped["rounds"]["1"]["stages"]["filter"]["committed_at"]

    resumed = _continuous(tmp_path, monkeypatch, patience=1)
    assert resumed["rounds"]["1"]["stages"]["filter"]["committed_at"] == committed  # not redone
    assert sorted(resumed["rounds"]) == ["0", "1", "2"] and not resumed["rounds"]["2"]["stages"]["promote"]["promoted"]
    assert resumed["stopped_because"] == "no promotion in 1 rounds in a row"


def test_a_continuous_run_stops_when_its_time_budget_is_spent(tmp_path, monkeypatch):
    manifest = _continuous(tmp_path, monkeypatch, time_budget_s=0.001)
    assert manifest["stopped_because"].startswith("time budget") and sorted(manifest["rounds"]) == ["0"]


def test_shards_in_flight_follow_the_replicas(tmp_path):
    config = parse_config(
        {
            "store": {"root": str(tmp_path)},
            "serve": {"generator": {"replicas": 3}, "evaluator": {"autoscaling": {"max_replicas": 10}}},
            "fanout": {"max_in_flight": 8},
        }
    )
    driver = LoopDriver(config, clients=None, run_id="r")
    assert [driver.run_state.in_flight(app) for app in ("generator", "filter", "evaluator")] == [6, 2, 8]


def test_a_rerun_with_another_shard_size_mixes_no_layouts(run):
    """Crash mid-stage with one task a shard, resume with three: the old ledger is not used for the new
    layout (its parts would overlap the new shards), so nothing is doubled or lost."""
    CrashingClients.calls = 0
    whole, whole_clients, _ = run("whole")
    with pytest.raises(KeyboardInterrupt):
        run("relaid", {**SMALL_SHARDS, "max_in_flight": 1}, CrashingClients)
    resumed, resumed_clients, _ = run("relaid", {**SMALL_SHARDS, "tasks_per_shard": 3})
    assert (
        resumed["rounds"]["1"]["stages"]["generate_instances"]["shards"]
        < resumed["rounds"]["1"]["stages"]["classify"]["count"]
    )
    assert _stage_records(resumed, resumed_clients.store) == _stage_records(whole, whole_clients.store)


class CrashAtTheControlsEvaluation(InProcessClients):
    """The driver dies once the control is trained, while its evaluation is in flight."""

    def stream_evaluation(self, request, on_progress=None):
        if "control_evaluate" in request.eval_tasks.uri:
            raise KeyboardInterrupt("killed")
        return super().stream_evaluation(request, on_progress)


def test_the_control_is_trained_and_evaluated_once_per_run_and_survives_a_resume(run):
    with pytest.raises(KeyboardInterrupt):
        run("store", clients_class=CrashAtTheControlsEvaluation)
    manifest, clients, _ = run("store")  # the same store: a resume
    controls = [t for t in clients.trainings if t.output_model_uri.endswith("control_model")]
    assert controls == []  # trained before the crash, committed, not trained again
    round_0 = manifest["rounds"]["0"]["stages"]
    assert round_0["control_train"]["model_uri"].endswith("round-000/control_model")
    control = round_0["control_evaluate"]
    assert control["num_tasks"] == round_0["split"]["dev_tasks"] and control["task_metrics"]
    # every round is gated against it, and the test stage compares model 0, the control and the final model
    for k in "12":
        gates = {g["against"] for g in manifest["rounds"][k]["stages"]["promote"]["comparisons"]}
        assert "control" in gates
    test = manifest["rounds"]["2"]["stages"]["test"]
    assert test["control_model"] == round_0["control_train"]["model_uri"] and len(test["over_control"]) == 3
    assert set(test["answer_words"]) == {"model_0", "control", "final"}


def test_with_no_control_the_gate_compares_with_the_incumbent_alone(run, monkeypatch):
    monkeypatch.setitem(globals(), "_settings", _no_control(_settings))
    manifest, clients, _ = run("no-control")
    assert "control_train" not in manifest["rounds"]["0"]["stages"]
    assert [g["against"] for g in manifest["rounds"]["1"]["stages"]["promote"]["comparisons"]] == ["incumbent"]
    assert manifest["rounds"]["2"]["stages"]["test"]["control_model"] == ""


def _no_control(settings):
    def without(*args, **kwargs):
        out = settings(*args, **kwargs)
        out["loop"] = {**out["loop"], "control": False}
        return out

    return without


def test_training_mixes_cap_each_seed_task_one_label_first(run):
    manifest, clients, _ = run(seed_instances_per_task=1)
    store, rounds = clients.store, manifest["rounds"]
    seeds = {t.id: t for t in store.read_tasks(rounds["0"]["stages"]["split"]["seed_train_uri"])}
    assert max(len(t.instances) for t in seeds.values()) > 1, "the built-in seeds carry several instances"
    for name, stage in (("control_mix", "control_data"), ("train_mix", "train_data")):
        k = "0" if stage == "control_data" else "2"
        mixed = [t for t in store.read_tasks(rounds[k]["stages"][stage]["uri"]) if t.id in seeds]
        assert len(mixed) == len(seeds) and all(len(t.instances) == 1 for t in mixed), name
    backward = store.read_tasks(rounds["0"]["stages"]["backward_data"]["uri"])
    assert len(backward) == len(seeds) and all(len(t.instances) == 1 for t in backward)
    # generation still shows every instance: the split itself is not capped
    assert sum(len(t.instances) for t in seeds.values()) > len(seeds)


def test_a_capped_classification_task_keeps_a_second_label_before_a_second_of_any():
    from ray_jobs.run import _labels_first
    from services.common.records import Instance

    instances = [Instance("a", "yes"), Instance("b", "yes"), Instance("c", "no"), Instance("d", "no")]
    assert [i.input for i in _labels_first(instances)] == ["a", "c", "b", "d"]
