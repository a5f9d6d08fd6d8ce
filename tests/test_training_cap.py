"""serve.max_training_jobs: a StartTraining beyond the cap is refused at once (RESOURCE_EXHAUSTED), not
queued behind runs that may take hours; below it the run is submitted. Ray's job API is replaced by a
stand-in that lists the cluster's jobs (the trainer asks it, so the cap holds across trainer replicas)."""

import re
from types import SimpleNamespace

import grpc
import pytest

from services.common.config import TrainingConfig
from services.common.grpc_handler import _status_for
from services.common.store import RunStore
from services.common.validation import Overloaded
from services.trainer.service import TrainerService


class JobApi:
    def __init__(self, running: int):
        self.jobs = [SimpleNamespace(submission_id=f"train-other-{i}", status="RUNNING") for i in range(running)]
        self.jobs.append(SimpleNamespace(submission_id="train-done", status="SUCCEEDED"))
        self.jobs.append(SimpleNamespace(submission_id="not-training", status="RUNNING"))
        self.submitted = []

    def list_jobs(self):
        return self.jobs

    def get_job_info(self, submission_id):
        if submission_id not in self.submitted:
            raise RuntimeError(f"job {submission_id} does not exist")
        return SimpleNamespace(status="PENDING", metadata={}, message="")

    def submit_job(self, entrypoint, submission_id, **options):
        self.submitted.append(submission_id)
        self.options = options


@pytest.mark.parametrize("running, refused", [(2, True), (1, False)])
def test_training_runs_beyond_the_cap_are_refused(tmp_path, running, refused):
    store = RunStore(str(tmp_path))
    service = TrainerService(store, max_active_jobs=2)
    service._client = JobApi(running)
    start = lambda: service.start("r", 1, "builtin:tiny-llama", "x.parquet", store.model_uri("r", 1), TrainingConfig())  # noqa: E731
    if refused:
        with pytest.raises(Overloaded, match="serve.max_training_jobs") as info:
            start()
        assert _status_for(info.value, "StartTraining")[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert service._client.submitted == []
    else:
        job = start()
        assert service._client.submitted == [job.job_id] and job.job_id.startswith("train-")
        # the API token the head holds does not reach the training job's environment
        assert service._client.options["runtime_env"]["env_vars"]["REINSTRUCT_API_TOKEN"] == ""


def test_open_training_streams_cannot_starve_other_calls(tmp_path):
    """StreamTraining holds a request slot while it runs: at most half of serve.max_ongoing_requests
    streams are open on a replica; the next is refused at once, and GetTrainingStatus still answers."""
    from services.api import trainer_pb2
    from services.trainer.deployment import TrainerDeployment
    from tests.tiny import owned_context

    replica = TrainerDeployment.func_or_class(
        {"store": {"root": str(tmp_path)}, "serve": {"max_ongoing_requests": 4}, "training": {"poll_interval_s": 0.01}}
    )
    api = JobApi(0)
    api.submitted.append("train-long")
    model_uri = str(tmp_path / "r" / "round-001" / "model")
    api.get_job_info = lambda job_id: SimpleNamespace(
        status="RUNNING", metadata={"model_uri": model_uri, "run_id": "r"}, message=""
    )
    replica.service._client = api
    request = trainer_pb2.GetTrainingStatusRequest(job_id="train-long", context=owned_context(str(tmp_path), "r"))
    open_streams = [replica.StreamTraining(request) for _ in range(2)]
    assert [next(s).state for s in open_streams] == [trainer_pb2.TrainingStatus.RUNNING] * 2
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED.*poll GetTrainingStatus"):
        next(replica.StreamTraining(request))
    assert replica.GetTrainingStatus(request).state == trainer_pb2.TrainingStatus.RUNNING
    open_streams[0].close()  # a client goes away: its slot is free again
    assert next(replica.StreamTraining(request)).job_id == "train-long"


class RecordingJobApi(JobApi):
    """Knows the jobs it was given: status FAILED once stopped, with the metadata the trainer sent."""

    def __init__(self):
        super().__init__(0)
        self.state, self.metadata, self.entrypoints = "RUNNING", {}, []

    def get_job_info(self, submission_id):
        if submission_id not in self.submitted:
            raise RuntimeError(f"job {submission_id} does not exist")
        return SimpleNamespace(status=self.state, metadata=self.metadata, message="")

    def submit_job(self, entrypoint, submission_id, **options):
        super().submit_job(entrypoint, submission_id, **options)
        self.entrypoints.append(entrypoint)
        self.metadata = options["metadata"]

    def stop_job(self, submission_id):
        self.state = "FAILED"


def test_the_trainer_keeps_its_files_in_the_run_store_not_on_local_disk():
    """Spec, progress and cancel files go through the run store: on a store that is not a local
    directory (fsspec's in-memory filesystem here, an object store in production) training is
    submitted, watched and cancelled alike."""
    store = RunStore("memory:///trainer-files")
    service = TrainerService(store)
    service._client = api = RecordingJobApi()
    model_uri = store.model_uri("r", 1)
    job = service.start("r", 1, "builtin:tiny-llama", store.dataset_uri("r", 1, "train"), model_uri, TrainingConfig())
    spec_uri = store.beside(model_uri, f".{job.job_id}.spec.json")
    assert spec_uri.startswith("memory://") and store.read_json(spec_uri)["model_uri"] == model_uri
    assert f"--store-root memory:///trainer-files --spec {spec_uri}" in api.entrypoints[0]

    store.write_json(job.progress_uri, {"step": 7, "total_steps": 20, "losses": [2.0, 1.5], "examples": 40})
    job = service.status(job.job_id)
    assert (job.state, job.step, job.total_steps, job.losses, job.examples) == ("RUNNING", 7, 20, [2.0, 1.5], 40)

    service.cancel(job.job_id)
    assert store.exists(job.cancel_uri) and api.state == "RUNNING"  # step 7: the training loop sees the file
    api.state = "FAILED"  # the loop raised Cancelled
    job = service.status(job.job_id)
    assert (job.state, job.error) == ("CANCELLED", "cancelled by request")


def test_a_training_job_is_seen_and_controlled_by_its_own_run_only(tmp_path):
    """GetTrainingStatus, StreamTraining and CancelTraining answer the key of the job's run only:
    without a key INVALID_ARGUMENT naming context.run_key, with another run's key the job is no job
    at all (nothing of it read, nothing cancelled), with a wrong key PERMISSION_DENIED."""
    from services.api import common_pb2, trainer_pb2
    from services.trainer.deployment import TrainerDeployment
    from tests.tiny import owned_context

    replica = TrainerDeployment.func_or_class({"store": {"root": str(tmp_path)}})
    replica.service._client = api = RecordingJobApi()
    model_uri = str(tmp_path / "victim" / "round-001" / "model")
    job = replica.service.start("victim", 1, "builtin:tiny-llama", "x.parquet", model_uri, TrainingConfig())
    assert len(job.job_id) > 30  # random: nobody computes another run's job id
    victim = owned_context(str(tmp_path), "victim")
    other = owned_context(str(tmp_path), "attacker")
    ask = trainer_pb2.GetTrainingStatusRequest
    for method in (replica.GetTrainingStatus, replica.CancelTraining):
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: context.run_key"):
            method(ask(job_id=job.job_id, context=common_pb2.RunContext(run_id="victim")))
        with pytest.raises(RuntimeError, match="PERMISSION_DENIED"):
            method(ask(job_id=job.job_id, context=common_pb2.RunContext(run_id="victim", run_key="guess")))
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: job_id: no training job"):
            method(ask(job_id=job.job_id, context=other))
    with pytest.raises(RuntimeError, match="no training job"):
        next(replica.StreamTraining(ask(job_id=job.job_id, context=other)))
    assert api.state == "RUNNING" and not (tmp_path / "victim" / "round-001" / f".{job.job_id}.cancel").exists()
    assert replica.GetTrainingStatus(ask(job_id=job.job_id, context=victim)).job_id == job.job_id
    replica.CancelTraining(ask(job_id=job.job_id, context=victim))
    assert api.state == "FAILED"  # step 0: stopped


def test_a_checkpoint_its_run_did_not_train_is_never_adopted(tmp_path):
    """A checkpoint found at the output is reported as trained only with the commit record its own
    job wrote, and only while the checkpoint is what that job committed; a planted one is refused."""
    from services.common.validation import RequestError
    from services.trainer.service import commit_record_uri

    store = RunStore(str(tmp_path))
    model_uri = store.model_uri("r", 1)
    service = TrainerService(store)
    service._client = api = RecordingJobApi()
    planted = tmp_path / "r" / "round-001" / "model"
    planted.mkdir(parents=True)
    (planted / "config.json").write_text("{}")
    start = lambda: service.start("r", 1, "builtin:tiny-llama", "x.parquet", model_uri, TrainingConfig())  # noqa: E731
    with pytest.raises(RequestError, match="no training job of this run committed"):
        start()
    assert api.submitted == []
    (planted / "config.json").unlink()
    job = start()  # trains; its job commits and records the checkpoint (services.trainer.job)
    (planted / "config.json").write_text('{"trained": true}')
    record = {"job_id": job.job_id, "model_uri": model_uri, "digest": store.tree_digest(model_uri)}
    store.write_json(commit_record_uri(store, job.job_id, model_uri), record)
    api.submitted.clear()  # Ray forgot the job (a new cluster): the commit record speaks for it
    adopted = start()
    assert (adopted.job_id, adopted.state, adopted.model_digest) == (job.job_id, "SUCCEEDED", record["digest"])
    (planted / "config.json").write_text('{"trained": "by someone else"}')
    with pytest.raises(RequestError, match="changed since"):
        start()


def test_a_job_whose_workers_never_start_is_stopped_after_the_start_timeout(tmp_path):
    """training.start_timeout_s: a job with no progress (no worker started: no room for it) that long
    after Ray started it is stopped, and every later status says why; a job that reports progress is
    left alone however long it runs."""
    import time

    store = RunStore(str(tmp_path))
    service = TrainerService(store, start_timeout_s=30)
    service._client = api = RecordingJobApi()
    job = service.start("r", 1, "builtin:tiny-llama", "x.parquet", store.model_uri("r", 1), TrainingConfig())
    started = time.time() * 1000
    info = api.get_job_info
    api.get_job_info = lambda job_id: SimpleNamespace(**{**vars(info(job_id)), "start_time": started})
    assert service.status(job.job_id).state == "RUNNING" and api.state == "RUNNING"  # within the timeout
    started -= 60_000  # a minute ago
    stopped = service.status(job.job_id)
    assert stopped.state == "FAILED" and api.state == "FAILED"  # stop_job was called
    assert "no training worker started within 30 s (training.start_timeout_s)" in stopped.error
    assert "1 workers need 1 CPU each" in stopped.error
    api.state = "STOPPED"  # Ray's own state for a stopped job, which otherwise reads as CANCELLED
    assert (service.status(job.job_id).state, service.status(job.job_id).error) == ("FAILED", stopped.error)

    other = service.start("r", 2, "builtin:tiny-llama", "x.parquet", store.model_uri("r", 2), TrainingConfig())
    api.state = "RUNNING"
    store.write_json(other.progress_uri, {"step": 0, "total_steps": 9, "losses": [], "examples": 3})
    assert service.status(other.job_id).state == "RUNNING" and api.state == "RUNNING"  # started: not stopped


def test_a_refused_start_training_leaves_no_inline_training_set_behind(tmp_path, monkeypatch):
    from services.api import common_pb2, trainer_pb2
    from services.trainer import deployment
    from tests.tiny import owned_context

    monkeypatch.setattr(deployment, "_check_placement", lambda params: None)  # no Ray cluster here
    replica = deployment.TrainerDeployment.func_or_class(
        {"store": {"root": str(tmp_path)}, "serve": {"max_training_jobs": 1}}
    )
    replica.service._client = JobApi(running=1)  # the one training slot is taken
    task = common_pb2.Task(id="t", instruction="Say hi.", instances=[common_pb2.Instance(output="hi")])
    request = trainer_pb2.StartTrainingRequest(
        context=owned_context(str(tmp_path), "r"),
        base_model_uri="builtin:tiny-llama",
        train_tasks=common_pb2.TaskSource(inline=common_pb2.TaskBatch(tasks=[task] * 50)),
        output_model_uri=str(tmp_path / "r" / "round-001" / "model"),
    )
    for _ in range(3):
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            replica.StartTraining(request)
    assert not (tmp_path / "r" / "inline").exists() or not list((tmp_path / "r" / "inline").iterdir())
    replica.service._client = api = RecordingJobApi()  # room again: the set is written and trained on
    job = replica.StartTraining(request)
    written = list((tmp_path / "r" / "inline").iterdir())
    assert len(written) == 1 and api.submitted == [job.job_id]
    assert replica.StartTraining(request).job_id == job.job_id  # a retry attaches and writes nothing more
    assert list((tmp_path / "r" / "inline").iterdir()) == written


def test_the_drivers_wait_for_a_training_job_that_stalls_is_bounded():
    """training.stall_timeout_s: no new step for that long cancels the job and fails the wait."""
    from services.api import trainer_pb2
    from services.client import ServiceClients

    class Stalled(ServiceClients):
        cancelled: list = []

        def start_training(self, request):
            return trainer_pb2.TrainingStatus(job_id="train-x", state=trainer_pb2.TrainingStatus.RUNNING, step=3)

        def training_status(self, job_id, context):
            return trainer_pb2.TrainingStatus(job_id=job_id, state=trainer_pb2.TrainingStatus.RUNNING, step=3)

        def cancel_training(self, job_id, context):
            self.cancelled.append(job_id)

    clients = Stalled("127.0.0.1:1", 1.0)
    with pytest.raises(RuntimeError, match=r"no new step in 0.2 s \(training.stall_timeout_s; last at step 3"):
        clients.wait_for_training(trainer_pb2.StartTrainingRequest(), poll_s=0.01, stall_timeout_s=0.2)
    assert clients.cancelled == ["train-x"]


@pytest.mark.parametrize(
    "params, field, message",
    [
        (dict(num_workers=5), "training.num_workers", "5 training workers need 5 CPUs; the cluster has 4"),
        (dict(num_workers=1, use_gpu=True), "training.use_gpu", "1 training workers need 1 GPUs; the cluster has 0"),
        (
            dict(num_workers=2, worker_resources={"training": 1}),
            "training.num_workers",
            "2 training workers need 2 of resource 'training' (training.worker_resources); the cluster has 1",
        ),
        (
            dict(num_workers=1, worker_resources={"serving": 1}),
            "training.num_workers",
            "need 1 of resource 'serving'",
        ),
    ],
)
def test_a_run_the_cluster_cannot_place_is_refused_naming_the_field(monkeypatch, params, field, message):
    """What one worker needs (services/trainer/placement.py: the same rule the job's scaling config
    and the unplaced-job message use), times the workers, against what the cluster has."""
    import ray

    from services.common.validation import RequestError
    from services.trainer import deployment

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "training": 1.0})
    deployment._check_placement(TrainingConfig(num_workers=4))
    deployment._check_placement(TrainingConfig(num_workers=1, worker_resources={"training": 1}))
    with pytest.raises(RequestError, match=re.escape(message)) as refused:
        deployment._check_placement(TrainingConfig(**params))
    assert refused.value.field == field


def test_the_job_asks_ray_for_what_the_check_counts():
    from services.trainer.job import _worker_resources

    assert _worker_resources(TrainingConfig()) is None  # Ray Train's own default
    assert _worker_resources(TrainingConfig(use_gpu=True, worker_resources={"training": 1})) == {
        "GPU": 1,
        "training": 1,
    }
