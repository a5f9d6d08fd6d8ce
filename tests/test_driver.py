"""The loop driver without Ray: the real deployment classes answer in-process (no gRPC), the generator
and evaluator with a scripted engine, and a trainer that records its requests and writes a stub
checkpoint. Checks the round's method: the pool refresh within a round, greedy instances, rescoring
of every backtranslated pair, fine-tuning from the base model, the dev/test split and the test stage."""

import json
import os

import pytest

from ray_jobs.self_improve import LoopDriver
from services.api import trainer_pb2
from services.common.config import parse_config
from services.common.formats import load_seed_tasks
from services.common.store import RunStore
from services.evaluator import deployment as evaluator_deployment
from services.filter.deployment import FilterDeployment
from services.generator import deployment as generator_deployment
from services.generator.engines import Completion, ModelSessions

REFERENCES = {t.instruction.strip(): t.instances[0].output.strip() for t in load_seed_tasks()}


class ScriptedEngine(ModelSessions):
    """Answers every prompt kind the loop sends; trained models (round >= 1) answer held-out tasks right."""

    def __init__(self):
        self.model_uri, self.tokenizer, self.calls, self.written = None, None, [], 0

    def load(self, model_uri):
        self.model_uri = model_uri

    def _answer(self, prompt: str) -> str:
        if prompt.startswith("Come up with a series of"):
            self.written += 2
            return f" Write a limerick about the number {self.written}.\n10. Name {self.written + 1} rivers of Peru."
        if "Is it classification?" in prompt:
            return " No"
        if prompt.startswith(("Come up with examples", "Given the classification task")):
            return "Example 1\nOutput: an answer\nExample 2\nOutput: another answer\n"
        if prompt.startswith("Below is a response"):
            self.written += 1
            return f" Explain what passage number {self.written} of the documentation says."
        if "5-point scale" in prompt:
            return " A helpful answer.\nScore: 5"
        instruction = prompt.split("\n\n")[0].strip()
        trained = "round-" in (self.model_uri or "")
        return f" {REFERENCES.get(instruction, 'no idea')}" if trained else " no idea"

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [Completion(self._answer(p), "stop") for p in prompts]

    def score_nll(self, prompts, responses, max_len=0):
        return [1.0 for _ in prompts]


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

    def stream_evaluation(self, request, on_progress=None):
        return self.evaluator.EvaluateModel(request)

    def compare_models(self, request):
        return self.evaluator.CompareModels(request)

    def wait_for_training(self, request, poll_s=0.0, on_progress=None):
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


def _settings(root: str, **training) -> dict:
    return {
        "model": {"base": "scripted-base"},
        "store": {"root": root},
        "generation": {"num_prompts": 4, "pool_refresh_prompts": 2},
        "training": training,
        "backtranslation": {"segments_per_round": 3},
        "loop": {"rounds": 2},
    }


@pytest.fixture
def run(tmp_path, monkeypatch):
    def go(**training):
        settings = _settings(str(tmp_path / "store"), **training)
        engine = ScriptedEngine()
        clients = InProcessClients(settings, engine, monkeypatch)
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

    # instances are decoded greedily with presence penalty 1.5; curation is greedy too
    instance_params = [p for prompts, p in engine.calls if prompts[0].startswith("Come up with examples")]
    assert instance_params and all(p.temperature == 0.0 and p.presence_penalty == 1.5 for p in instance_params)
    rating_params = [p for prompts, p in engine.calls if "5-point scale" in prompts[0]]
    assert rating_params and all(p.temperature == 0.0 and p.max_new_tokens == 96 for p in rating_params)

    # every round fine-tunes the base model; the backward model is trained once
    assert [t.base_model_uri for t in clients.trainings] == ["scripted-base"] * 3
    assert rounds["2"]["stages"]["train"]["base_model"] == "scripted-base"  # recorded in the manifest
    assert [rounds[k]["stages"]["filter_augmented"]["curation_threshold"] for k in "12"] == [5, 5]  # k=5 both

    # rescoring: round 2 rates round 1's pairs again, and only its own ratings choose the kept set
    backtranslated = {k: {t.id for t in store.read_tasks(rounds[k]["stages"]["backtranslate"]["uri"])} for k in "12"}
    rated = {t.id for t in store.read_tasks(rounds["2"]["stages"]["rating_pool"]["uri"])}
    assert rated == backtranslated["1"] | backtranslated["2"] and len(rated) == 6
    mix = store.read_tasks(rounds["2"]["stages"]["train_data"]["uri"])
    assert rounds["2"]["stages"]["train_data"]["augmented"] == rounds["2"]["stages"]["filter_augmented"]["kept_count"]
    assert len([t for t in mix if t.lineage.stage == "backtranslate"]) == len(rated)  # all scored 5, no doubles

    # the gate decides on dev; the test stage scores model 0 and the final model once on test
    split = rounds["0"]["stages"]["split"]
    assert not set(split["dev_task_ids"]) & set(split["test_task_ids"])
    assert rounds["0"]["stages"]["evaluate"]["model_uri"] == "scripted-base"
    assert rounds["1"]["stages"]["promote"]["promoted"] and not rounds["2"]["stages"]["promote"]["promoted"]
    test = rounds["2"]["stages"]["test"]
    assert test["model_0"] == "scripted-base" and test["final_model"] == manifest["final_model"]
    assert test["final_model"].endswith("round-001/model") and test["num_tasks"] == split["test_tasks"]
    assert test["final_score"] > test["model_0_score"] and test["difference"][1] > 0


def test_continue_from_the_promoted_model(run):
    _, clients, _ = run(from_base=False)
    bases = [t.base_model_uri for t in clients.trainings]
    assert bases[:2] == ["scripted-base", "scripted-base"] and bases[2].endswith("round-001/model")


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
