"""serve.max_training_jobs: a StartTraining beyond the cap is refused at once (RESOURCE_EXHAUSTED), not
queued behind runs that may take hours; below it the run is submitted. Ray's job API is replaced by a
stand-in that lists the cluster's jobs (the trainer asks it, so the cap holds across trainer replicas)."""

from types import SimpleNamespace

import grpc
import pytest

from services.common.grpc_handler import _status_for
from services.common.store import RunStore
from services.common.validation import Overloaded
from services.trainer.service import TrainerService, TrainingParams


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
    start = lambda: service.start("r", 1, "builtin:tiny-llama", "x.parquet", store.model_uri("r", 1), TrainingParams())  # noqa: E731
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

    replica = TrainerDeployment.func_or_class(
        {"store": {"root": str(tmp_path)}, "serve": {"max_ongoing_requests": 4}, "training": {"poll_interval_s": 0.01}}
    )
    api = JobApi(0)
    api.submitted.append("train-long")
    api.get_job_info = lambda job_id: SimpleNamespace(
        status="RUNNING", metadata={"model_uri": str(tmp_path / "m")}, message=""
    )
    replica.service._client = api
    request = trainer_pb2.GetTrainingStatusRequest(job_id="train-long")
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
    job = service.start("r", 1, "builtin:tiny-llama", store.dataset_uri("r", 1, "train"), model_uri, TrainingParams())
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
