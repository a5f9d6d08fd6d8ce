"""MLflow tracking against a real `mlflow server` started here (SQLite backend, loopback, a free port,
artifacts in tmp): the loop runs in-process (tests/test_driver.py's deployments and scripted engine),
and the runs are read back through MlflowClient and compared with the manifest. Resume, a server
killed mid-run, the embedded SQLite default, and the training job's loss per step from rank 0."""

import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ray_jobs.run import Reporter
from ray_jobs.self_improve import LoopDriver
from ray_jobs.tracking import TrackingReporter, flat_params, loss_log
from ray_jobs.tracking import main as sync_main
from services.api import common_pb2, trainer_pb2
from services.common.config import parse_config
from services.common.store import RunStore
from services.common.tracking_server import tracking_uri
from services.trainer.deployment import TrainerDeployment
from services.trainer.loss_log import LossTarget, StepLogger
from tests.test_driver import InProcessClients, ScriptedEngine, _settings
from tests.test_helm_chart import _template, helm  # noqa: F401 (helm: the chart tests' fixture)


class MlflowServer:
    """`mlflow server` in its own process group, so a test can kill it (SIGKILL, all its workers)
    and start it again on the same port and database."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.root, self.uri, self.process = root, f"http://127.0.0.1:{self.port}", None

    def start(self, timeout_s: float = 180) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root}/mlflow.db",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner process
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    running.start()
    yield running
    running.stop()


def _loop(tmp_path, monkeypatch, tracking: dict, clients_class=InProcessClients, rounds: int = 2, run_id: str = "r"):
    """The driver's loop as `reinstruct run` runs it, with the tracker around its reporter."""
    settings = _settings(str(tmp_path / "store"))
    settings["loop"]["rounds"] = rounds
    settings["tracking"] = tracking
    config = parse_config(settings)
    clients = clients_class(settings, ScriptedEngine(), monkeypatch)
    reporter = TrackingReporter.around(Reporter(), config, run_id)
    with reporter.session():
        LoopDriver(config, clients, run_id, reporter).run()
    return RunStore(config.store.root).load_manifest(run_id), config  # as the session's end left it


def _runs(client: MlflowClient, experiment: str, kind: str) -> list:
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"tags.`reinstruct.kind` = '{kind}'")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _no_step_twice(client: MlflowClient, run) -> None:
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has a step logged twice: {sorted(steps)}"


def _assert_matches_manifest(client: MlflowClient, manifest: dict) -> None:
    """Every committed stage is logged, at step = round, with the manifest's values."""
    parent, rounds = manifest["mlflow"]["run_id"], manifest["mlflow"]["rounds"]
    assert sorted(rounds, key=int) == sorted(manifest["rounds"], key=int)
    for key, entry in manifest["rounds"].items():
        k, round_run = int(key), client.get_run(rounds[key])
        assert round_run.data.tags["mlflow.parentRunId"] == parent
        for name, output in entry["stages"].items():
            assert f"reinstruct.logged.{name}" in round_run.data.tags, (k, name)
            assert (k, output["elapsed_s"]) in _history(client, parent, f"{name}.elapsed_s"), (k, name)
        stages = entry["stages"]
        if "evaluate" in stages:
            for field in ("score", "nll", "answer_words"):
                assert (k, stages["evaluate"][field]) in _history(client, parent, f"evaluate.{field}")
        promote = stages["promote"]
        assert (k, float(promote["promoted"])) in _history(client, parent, "promote.promoted")
        for bound in ("low", "high"):
            assert (k, promote[bound]) in _history(client, parent, f"promote.{bound}")
        for gate in promote["comparisons"]:
            for part, value in zip(("estimate", "low", "high"), gate["gain"]):
                assert (k, value) in _history(client, parent, f"promote.{gate['against']}.gain.{part}")
            assert round_run.data.metrics[f"promote.{gate['against']}.passed"] == float(gate["passed"])
        assert round_run.data.tags["promote.reason"] == promote["reason"][:5000]
        if "filter" in stages:
            f, metrics = stages["filter"], round_run.data.metrics
            assert (k, f["kept_count"]) in _history(client, parent, "filter.kept_count")
            for rule, removed in f["funnel"].items():
                assert metrics[f"filter.removed.{rule}"] == removed
                assert metrics[f"filter.removed_share.{rule}"] == pytest.approx(removed / f["candidates"])
        if "train" in stages:
            train = stages["train"]
            assert round_run.data.tags["train.model_uri"] == train["model_uri"]
            assert _history(client, round_run.info.run_id, "train.loss") == list(enumerate(train["losses"], 1))
        if "control_evaluate" in stages:
            assert round_run.data.metrics["control_evaluate.score"] == stages["control_evaluate"]["score"]
        if "test" in stages:
            assert (k, stages["test"]["final_score"]) in _history(client, parent, "test.final_score")
        _no_step_twice(client, round_run)
    _no_step_twice(client, client.get_run(parent))


def test_a_run_and_its_rounds_read_back_as_the_manifest(server, tmp_path, monkeypatch):
    tracking = {"uri": server.uri, "experiment": "readback", "registered_model": "readback-models"}
    manifest, config = _loop(tmp_path, monkeypatch, tracking)
    client = MlflowClient(server.uri)
    [run] = _runs(client, "readback", "run")
    assert run.info.run_id == manifest["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["reinstruct.run_id"] == "r"
    assert run.data.tags["reinstruct.final_model"] == manifest["final_model"]
    assert manifest["mlflow"]["unlogged"] == []
    # the config as params: exactly the values the driver used
    assert run.data.params == flat_params(config)
    assert run.data.params["generation.num_prompts"] == "4" and run.data.params["loop.rounds"] == "2"
    assert len(_runs(client, "readback", "round")) == len(manifest["rounds"]) == 3
    _assert_matches_manifest(client, manifest)

    # artifacts: the report, the manifest, the config; a table of kept and rejected tasks per filter
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "manifest.json", "config.json"} <= names
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read_text())
    assert logged["rounds"] == manifest["rounds"]
    assert "<html" in Path(client.download_artifacts(run.info.run_id, "report.html", str(tmp_path))).read_text()
    round_1 = manifest["mlflow"]["rounds"]["1"]
    table = json.loads(Path(client.download_artifacts(round_1, "filter_sample.json", str(tmp_path))).read_text())
    verdicts = [row[table["columns"].index("verdict")] for row in table["data"]]
    assert "kept" in verdicts and any(v.startswith("rejected:") for v in verdicts)

    # the registry: round 1's promoted model (round 2 was not promoted; model 0 is model.base itself)
    [version] = client.search_model_versions("name = 'readback-models'")
    assert version.tags["reinstruct.round"] == "1" and version.tags["reinstruct.run_id"] == "r"
    assert version.tags["reinstruct.model_uri"] == manifest["rounds"]["1"]["stages"]["promote"]["model_uri"]
    assert version.tags["reinstruct.parent_model"] == "scripted-base" and version.run_id == round_1
    pointer = client.download_artifacts(round_1, "promoted_model/checkpoint.json", str(tmp_path / "p"))
    assert json.loads(Path(pointer).read_text())["model_uri"] == version.tags["reinstruct.model_uri"]


class _TrainerDiesInRound2(InProcessClients):
    def wait_for_training(self, request, poll_s=0.0, on_progress=None, stall_timeout_s=0.0):
        if request.context.round == 2:
            raise RuntimeError("the trainer died")
        return super().wait_for_training(request, poll_s, on_progress, stall_timeout_s)


def test_a_resumed_run_continues_the_same_mlflow_run(server, tmp_path, monkeypatch):
    tracking = {"uri": server.uri, "experiment": "resume", "registered_model": "resume-models"}
    with pytest.raises(RuntimeError, match="trainer died"):
        _loop(tmp_path, monkeypatch, tracking, clients_class=_TrainerDiesInRound2)
    client = MlflowClient(server.uri)
    [crashed] = _runs(client, "resume", "run")
    assert crashed.info.status == "FAILED"

    manifest, _ = _loop(tmp_path, monkeypatch, tracking)  # the rerun resumes round 2 at its training
    [run] = _runs(client, "resume", "run")
    assert run.info.run_id == crashed.info.run_id == manifest["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert len(_runs(client, "resume", "round")) == 3
    _assert_matches_manifest(client, manifest)
    counts = {k: len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}

    # one more round on the same run id, with the manifest's MLflow ids lost (a crash right after
    # creating the run): found again by its tags; nothing earlier is logged again; the change is named
    RunStore(str(tmp_path / "store")).update_run("r", mlflow=None)
    manifest, _ = _loop(tmp_path, monkeypatch, tracking, rounds=3)
    [run] = _runs(client, "resume", "run")
    assert run.info.run_id == crashed.info.run_id and len(_runs(client, "resume", "round")) == 4
    _assert_matches_manifest(client, manifest)
    for key, count in counts.items():
        assert len([m for m in client.get_metric_history(run.info.run_id, key) if m.step <= 2]) == count, key
    assert run.data.params["loop.rounds"] == "2"  # params are write-once: the first session's
    assert "loop.rounds" in run.data.tags["reinstruct.config_changed_on_resume"]
    assert len(client.search_model_versions("name = 'resume-models'")) == 1


def _killing_clients(server: MlflowServer, restart_in_round: int | None):
    class Clients(InProcessClients):
        """Kills the tracking server as round 1 trains; starts it again as round `restart_in_round` trains."""

        def wait_for_training(self, request, poll_s=0.0, on_progress=None, stall_timeout_s=0.0):
            if request.context.round == 1:
                server.stop()
            if request.context.round == restart_in_round:
                server.start()
            return super().wait_for_training(request, poll_s, on_progress, stall_timeout_s)

    return Clients


def test_a_server_killed_mid_run_fails_nothing_and_gets_the_missed_logs_when_back(
    server, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="reinstruct.tracking")
    tracking = {"uri": server.uri, "experiment": "outage", "max_backoff_s": 1, "request_timeout_s": 5}
    try:
        manifest, _ = _loop(tmp_path, monkeypatch, tracking, clients_class=_killing_clients(server, 2))
    finally:
        if server.process is None:
            server.start()
    assert manifest["status"] == "succeeded"
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed" in m and "the run goes on" in m for m in messages)
    assert any("reachable again" in m for m in messages)
    assert manifest["mlflow"]["unlogged"] == []
    _assert_matches_manifest(MlflowClient(server.uri), manifest)


def test_a_server_that_stays_down_is_named_at_the_end_and_a_sync_logs_the_rest(server, tmp_path, monkeypatch, caplog):
    tracking = {"uri": server.uri, "experiment": "down", "flush_timeout_s": 1, "request_timeout_s": 5}
    try:
        manifest, _ = _loop(tmp_path, monkeypatch, tracking, clients_class=_killing_clients(server, None))
        assert manifest["status"] == "succeeded"
        unlogged = RunStore(str(tmp_path / "store")).load_manifest("r")["mlflow"]["unlogged"]
        assert "round 1: train" in unlogged and "round 2: promote" in unlogged
        assert any("could not be logged" in r.getMessage() for r in caplog.records)
    finally:
        server.start()
    assert sync_main(["--store-root", str(tmp_path / "store"), "--run-id", "r"]) == 0
    manifest = RunStore(str(tmp_path / "store")).load_manifest("r")
    assert manifest["mlflow"]["unlogged"] == []
    client = MlflowClient(server.uri)
    [run] = _runs(client, "down", "run")
    assert run.info.status == "FINISHED"
    _assert_matches_manifest(client, manifest)


def test_the_default_is_a_sqlite_store_in_the_run_store(tmp_path, monkeypatch):
    """What `make run` writes, no server: <store.root>/mlflow.db, artifacts beside it."""
    manifest, config = _loop(tmp_path, monkeypatch, {}, rounds=1)
    root = os.path.realpath(tmp_path / "store")
    uri = f"sqlite:///{root}/mlflow.db"
    assert manifest["mlflow"]["tracking_uri"] == uri and os.path.exists(f"{root}/mlflow.db")
    assert manifest["mlflow"]["ui"] == f"mlflow ui --backend-store-uri {uri}"
    client = MlflowClient(uri)
    [run] = _runs(client, "reinstruct", "run")
    assert run.info.artifact_uri.startswith(f"file://{root}/mlflow-artifacts/reinstruct/")
    artifacts = run.info.artifact_uri.removeprefix("file://")
    assert os.path.exists(f"{artifacts}/report.html") and os.path.exists(f"{artifacts}/manifest.json")
    _assert_matches_manifest(client, manifest)


class _RecordingClients(InProcessClients):
    requests: list = []

    def wait_for_training(self, request, **options):
        type(self).requests.append(request)
        return super().wait_for_training(request, **options)


def test_each_training_request_names_its_rounds_mlflow_run(tmp_path, monkeypatch):
    """The driver's training requests (the rounds', the control's) carry the round's run and the
    stage's metric, at the driver's tracking server, as the trainer reads them."""
    monkeypatch.setattr(_RecordingClients, "requests", [])
    manifest, _ = _loop(tmp_path, monkeypatch, {}, clients_class=_RecordingClients)
    known = manifest["mlflow"]
    named = [r for r in _RecordingClients.requests if r.HasField("loss_log")]
    assert len(named) >= 4  # round 0, the backward model, the control, each round trained
    for request in named:
        assert request.loss_log.tracking_uri == known["tracking_uri"]
        assert request.loss_log.mlflow_run_id == known["rounds"][str(request.context.round)]
        written = request.output_model_uri.rstrip("/").rsplit("/", 1)[-1]
        stage = {"control_model": "control_train", "backward_model": "backward_train"}.get(written, "train")
        assert request.loss_log.metric_key == f"{stage}.loss"
    assert {r.loss_log.metric_key for r in named} == {"train.loss", "control_train.loss", "backward_train.loss"}


def test_tracking_off_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(_RecordingClients, "requests", [])
    manifest, _ = _loop(tmp_path, monkeypatch, {"enabled": False}, clients_class=_RecordingClients, rounds=1)
    assert manifest["status"] == "succeeded" and "mlflow" not in manifest
    assert not (tmp_path / "store" / "mlflow.db").exists()
    assert _RecordingClients.requests and not any(r.HasField("loss_log") for r in _RecordingClients.requests)


@pytest.mark.ray
def test_the_training_job_logs_its_loss_per_step_from_rank_0(server, tmp_path, builtin_cache):
    """A real (tiny) Ray Train job, started by the trainer service with the loss log the driver names
    (the round's run, from the manifest): its rank 0 logs train.loss per step while it trains, each
    step once."""
    import ray

    from services.common.config import TrainingConfig
    from services.common.formats import load_seed_tasks
    from services.serving import wait_for_previous_cluster
    from services.trainer.service import TrainerService

    store = RunStore(str(tmp_path))
    config = parse_config({"store": {"root": str(tmp_path)}, "tracking": {"uri": server.uri, "experiment": "job"}})
    store.update_run("job", config=config.model_dump())
    data = store.dataset_uri("job", 1, "train_mix")
    store.write_tasks(data, load_seed_tasks()[:16])
    reporter = TrackingReporter(Reporter(), config, "job")
    wait_for_previous_cluster()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)  # the job API for training
    try:
        with reporter.session():
            reporter.stage(1, "train", resumed=False)  # what Run.stage tells the reporter before training
            service = TrainerService(store, builtin_cache_dir=builtin_cache)
            params = TrainingConfig(epochs=1, batch_size=4, max_seq_len=128, checkpoint_every=1000)
            model = store.model_uri("job", 1)
            wanted = loss_log(store, config, "job", 1, model)  # what the driver puts in its request
            request = trainer_pb2.StartTrainingRequest(
                context=common_pb2.RunContext(run_id="job", round=1), loss_log=wanted
            )
            target = TrainerDeployment.func_or_class(config.model_dump())._loss_target(request)  # the replica's reading
            job = service.start("job", 1, "builtin:tiny-llama", data, model, params, loss_log=target)
            deadline = time.monotonic() + 300
            while (job := service.status(job.job_id)).state not in ("SUCCEEDED", "FAILED"):
                assert time.monotonic() < deadline, "training did not end"
                time.sleep(0.5)
    finally:
        ray.shutdown()
    assert job.state == "SUCCEEDED", job.error
    round_run = store.load_manifest("job")["mlflow"]["rounds"]["1"]
    logged = MlflowClient(server.uri).get_metric_history(round_run, "train.loss")
    assert job.step > 5 and sorted((m.step, m.value) for m in logged) == list(enumerate(job.losses, 1))


def test_a_restarted_training_worker_logs_no_step_twice(server):
    """Ray Train restarts a worker group from its last checkpoint: the steps after it were logged
    already by the dead rank 0, and the new one skips them."""
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("restart")
    run_id = client.create_run(experiment, tags={"reinstruct.run_id": "r", "reinstruct.round": "1"}).info.run_id
    target = LossTarget(
        tracking_uri=server.uri, mlflow_run_id=run_id, metric_key="train.loss", timeout_s=5, run_id="r", round=1
    )
    before = StepLogger(target)
    for step in range(1, 8):  # checkpoint at step 5, killed after step 7
        before.add(step, 1.0 / step)
        before.flush()
    after = StepLogger(target)  # resumed from the checkpoint at step 5
    for step in range(6, 11):
        after.add(step, 1.0 / step)
    after.flush(force=True)
    assert _history(client, run_id, "train.loss") == [(step, 1.0 / step) for step in range(1, 11)]


def test_a_training_job_writes_no_loss_into_another_runs_mlflow_run(server):
    """A request may name any MLflow run id: rank 0 logs only into a run tagged with the job's own
    reinstruct run and round, so no client can write into another run's loss curve."""
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("ownership")
    victim = client.create_run(experiment, tags={"reinstruct.run_id": "victim", "reinstruct.round": "1"}).info.run_id
    for job_run, job_round in (("attacker", 1), ("victim", 2)):  # another run; the right run, another round
        logger = StepLogger(
            LossTarget(
                tracking_uri=server.uri,
                mlflow_run_id=victim,
                metric_key="train.loss",
                timeout_s=5,
                run_id=job_run,
                round=job_round,
            )
        )
        logger.add(1, 9.0)
        logger.flush(force=True)
    assert _history(client, victim, "train.loss") == []


def test_tracking_uri_reaches_the_driver_and_the_training_jobs_through_the_chart(helm, tmp_path):  # noqa: F811
    """The chart hands `reinstruct` to the driver (--settings-b64) as to every app; the driver names
    the round's run in its training request (loss_log), at the URI it resolved, which is the trainer's."""
    done = _template(
        helm, None, ["--set", "loop.enabled=true", "--set", "reinstruct.tracking.uri=http://mlflow.mlflow:5000"]
    )
    assert done.returncode == 0, done.stderr
    job = next(o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "Job")
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    settings = json.loads(base64.b64decode(re.search(r"--settings-b64 (\S+)", command).group(1)))
    assert parse_config(settings).tracking.uri == "http://mlflow.mlflow:5000"

    store = RunStore(str(tmp_path))
    store.update_run("r", config=parse_config(settings).model_dump())
    store.update_run("r", mlflow={"tracking_uri": "http://mlflow.mlflow:5000", "rounds": {"2": "abc"}})
    config = parse_config(settings)
    wanted = loss_log(store, config, "r", 2, store.model_uri("r", 2))
    assert (wanted.tracking_uri, wanted.mlflow_run_id, wanted.metric_key) == (
        "http://mlflow.mlflow:5000",
        "abc",
        "train.loss",
    )
    assert wanted.tracking_uri == tracking_uri(parse_config(settings))  # the trainer's own: it logs there
    control = loss_log(store, config, "r", 2, store.uri("r", "round-002", "control_model"))
    assert control.metric_key == "control_train.loss"
    assert loss_log(store, config, "r", 3, store.model_uri("r", 3)) is None  # no such round run
    off = config.model_copy(update={"tracking": config.tracking.model_copy(update={"enabled": False})})
    assert loss_log(store, off, "r", 2, store.model_uri("r", 2)) is None  # resumed with tracking off
    moved = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": "http://new:5000"})})
    assert loss_log(store, moved, "r", 2, store.model_uri("r", 2)) is None  # the manifest's ids are another server's


def test_a_trainer_logs_the_loss_only_to_its_own_tracking_server(tmp_path):
    """The request names the round's run; the server is the one the trainer was deployed with: a
    request that names another gets no loss logged (never a request-chosen destination)."""
    from services.common.validation import RequestError

    replica = TrainerDeployment.func_or_class({"store": {"root": str(tmp_path)}})
    ours = f"sqlite:///{os.path.realpath(tmp_path)}/mlflow.db"

    def request(uri: str, run_id: str = "abc", key: str = "train.loss") -> trainer_pb2.StartTrainingRequest:
        wanted = trainer_pb2.LossLog(tracking_uri=uri, mlflow_run_id=run_id, metric_key=key)
        return trainer_pb2.StartTrainingRequest(context=common_pb2.RunContext(run_id="r", round=2), loss_log=wanted)

    assert replica._loss_target(request(ours)) == LossTarget(
        tracking_uri=ours, mlflow_run_id="abc", metric_key="train.loss", timeout_s=10, run_id="r", round=2
    )
    assert replica._loss_target(request("http://elsewhere:5000")) is None
    assert replica._loss_target(trainer_pb2.StartTrainingRequest()) is None  # unset: nowhere
    for bad_id in ("", "a'b", "x" * 65):
        with pytest.raises(RequestError, match="loss_log.mlflow_run_id"):
            replica._loss_target(request(ours, run_id=bad_id))
    with pytest.raises(RequestError, match="loss_log.metric_key"):
        replica._loss_target(request(ours, key="system/cpu"))
    off = TrainerDeployment.func_or_class({"store": {"root": str(tmp_path)}, "tracking": {"enabled": False}})
    assert off._loss_target(request(ours)) is None  # tracking off here: no MLflow file is ever created


def test_every_interval_of_the_stage_results_is_logged_as_its_bounds():
    """A list in a stage result is an interval (logged as .estimate/.low/.high) or per-item data; a new
    interval field must be named in tracking's table, or MLflow would silently miss it."""
    from dataclasses import fields

    from ray_jobs.manifest import STAGE_KINDS, Gate
    from ray_jobs.tracking import _INTERVALS

    kinds = [*STAGE_KINDS.values(), Gate]  # the gate's comparisons, inside promote's Decision
    lists = {f.name for kind in kinds for f in fields(kind) if f.type == "list[float]"}
    assert lists - {"max_rouge_l", "losses"} == set(_INTERVALS)
