"""Ray Serve deployment of the trainer (gRPC). Validation and proto conversion only."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid

from ray import serve

from ..api import trainer_pb2
from ..common.config import ReinstructConfig, TrainingConfig, config_from_app_args, replica_options
from ..common.grpc_handler import grpc_method, grpc_stream_method, refuse_other_services
from ..common.sections import from_message
from ..common.store import RunStore, current_request_run
from ..common.tracking_server import tracking_uri
from ..common.validation import (
    Overloaded,
    RequestError,
    TrustedModels,
    check_context,
    check_model_uri,
    check_output_uri,
    check_text,
    resolve_tasks,
)
from .loss_log import LossTarget
from .placement import worker_needs
from .service import TrainerService, TrainingJob

log = logging.getLogger("reinstruct.trainer")
_MLFLOW_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_METRIC_KEY = re.compile(r"[A-Za-z0-9_]{1,64}\.loss")

_STATES = {
    name: getattr(trainer_pb2.TrainingStatus, name)
    for name in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
}
_FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def _status(job: TrainingJob) -> trainer_pb2.TrainingStatus:
    return trainer_pb2.TrainingStatus(
        job_id=job.job_id,
        state=_STATES[job.state],
        step=job.step,
        total_steps=job.total_steps,
        loss=job.losses[-1] if job.losses else 0.0,
        losses=job.losses,
        model_uri=job.model_uri if job.state == "SUCCEEDED" else "",
        error=job.error,
        train_examples=job.examples,
        real_token_share=job.real_token_share,
        resumed_from_step=job.resumed_from_step,
        model_digest=job.model_digest if job.state == "SUCCEEDED" else "",
    )


def _check_placement(training: TrainingConfig) -> None:
    """Refuses a run this cluster cannot place (it would wait forever, holding a driver): each worker
    takes a GPU with use_gpu, else a CPU. An autoscaling cluster counts what it has now."""
    import ray

    total = ray.cluster_resources()
    for name, amount in worker_needs(training.use_gpu, training.worker_resources).items():
        need = amount * training.num_workers
        if total.get(name, 0) >= need:
            continue
        if name in ("CPU", "GPU"):
            field, what = ("training.use_gpu" if name == "GPU" else "training.num_workers"), f"{need:g} {name}s"
        else:  # training.worker_resources: a name no node advertises (enough of)
            field, what = "training.num_workers", f"{need:g} of resource {name!r} (training.worker_resources)"
        raise RequestError(
            field, f"{training.num_workers} training workers need {what}; the cluster has {total.get(name, 0):g}"
        )


@serve.deployment(name="Trainer")
@refuse_other_services("Trainer")
class TrainerDeployment:
    def __init__(self, settings: dict):
        self.config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(self.config.store.root, self.config.store.allowed_schemes)
        self.trusted = TrustedModels.from_config(self.config)
        self.serve_host = self.config.serve.host  # without a token, gRPC answers loopback clients only
        self.service = TrainerService(
            self.store,
            self.config.model.trust_remote_code,
            self.config.model.builtin_cache_dir,
            prompt_format=self.config.model.prompt_format,
            seed_tag=self.config.backtranslation.seed_tag,
            max_active_jobs=self.config.serve.max_training_jobs,
            start_timeout_s=self.config.training.start_timeout_s,
        )
        self._max_streams = max(1, self.config.serve.max_ongoing_requests // 2)
        self._streams = threading.BoundedSemaphore(self._max_streams)

    @grpc_method(trainer_pb2.TrainingStatus)
    def StartTraining(self, request: trainer_pb2.StartTrainingRequest):
        check_context(request.context)
        base = check_model_uri(request.base_model_uri, self.store, "base_model_uri", trusted=self.trusted)
        if not request.output_model_uri:
            raise RequestError("output_model_uri", "must not be empty")
        check_output_uri(
            request.output_model_uri, self.store, "output_model_uri", request.context.run_id, dataset=False
        )
        training = from_message(request.training, TrainingConfig, "training")
        augmented_tag = check_text(request.augmented_tag, "augmented_tag", limit=200)
        _check_placement(training)
        source = request.train_tasks
        kind = source.WhichOneof("source")
        if kind not in ("inline", "uri"):
            raise RequestError("train_tasks", "give tasks inline or a dataset uri")
        tasks = resolve_tasks(source, self.store, "train_tasks", require_instances=kind == "inline")
        run_id, output = request.context.run_id, request.output_model_uri
        recipe = (training, request.seed, augmented_tag, self._loss_target(request))
        admitted = self.service.admit(run_id, output)  # a retry attaches, a refusal raises: nothing written yet
        if admitted is not None:
            return _status(admitted)
        if kind == "uri":
            return _status(self.service.start(run_id, request.context.round, base, source.uri, output, *recipe))
        dataset_uri = self.store.uri(run_id, "inline", f"train-{uuid.uuid4().hex[:12]}.parquet")
        self.store.write_tasks(dataset_uri, tasks)
        try:
            job = self.service.start(run_id, request.context.round, base, dataset_uri, output, *recipe)
        except Exception:
            self.store.remove(dataset_uri)  # refused after all (a job started meanwhile): no file left behind
            raise
        if self.service.dataset_of(job) != dataset_uri:
            self.store.remove(dataset_uri)  # attached to a job another request started meanwhile
        return _status(job)

    def _loss_target(self, request: trainer_pb2.StartTrainingRequest) -> LossTarget | None:
        """The request's loss_log at this trainer's own tracking server; None when tracking is off here
        or the request names another server (a job never sends to a server it was not deployed with).
        The MLflow run must be the request's own run and round (StepLogger checks its tags)."""
        if not request.HasField("loss_log"):
            return None
        wanted = request.loss_log
        uri = check_text(wanted.tracking_uri, "loss_log.tracking_uri", required=True, limit=2048)
        if not _MLFLOW_RUN_ID.fullmatch(wanted.mlflow_run_id):
            raise RequestError("loss_log.mlflow_run_id", "must be an MLflow run id (letters, digits, _ or -)")
        if not _METRIC_KEY.fullmatch(wanted.metric_key):
            raise RequestError("loss_log.metric_key", "must be a metric name ending in .loss (letters, digits, _)")
        ours = tracking_uri(self.config) if self.config.tracking.enabled else None
        if ours is None or uri != ours:
            log.warning("loss_log names tracking server %r, this trainer's is %r: no loss logged", uri, ours)
            return None
        return LossTarget(
            tracking_uri=ours,
            mlflow_run_id=wanted.mlflow_run_id,
            metric_key=wanted.metric_key,
            timeout_s=self.config.tracking.request_timeout_s,
            run_id=request.context.run_id,
            round=request.context.round,
        )

    def _job(self, request: trainer_pb2.GetTrainingStatusRequest):
        """The job, if it is one of the request's run (whose key the handler checked): another run's
        job is answered as no job at all, before any of its files is read."""
        check_text(request.job_id, "job_id", required=True, limit=128)
        run_id = current_request_run()
        if run_id is None:
            raise RequestError(
                "context.run_key", "is needed to see or control a training job: the key of the job's run"
            )
        job = self.service.status(request.job_id, run_id)
        if job is None:
            raise RequestError("job_id", f"no training job {request.job_id!r} of run {run_id!r}")
        return job

    @grpc_method(trainer_pb2.TrainingStatus)
    def GetTrainingStatus(self, request: trainer_pb2.GetTrainingStatusRequest):
        return _status(self._job(request))

    @grpc_stream_method
    def StreamTraining(self, request: trainer_pb2.GetTrainingStatusRequest):
        """Status messages as the job moves. Streams hold a replica's request slots, so at most half of
        serve.max_ongoing_requests are open at once (more: RESOURCE_EXHAUSTED, poll GetTrainingStatus
        instead), and each ends after serve.request_timeout_s with the latest status (open another)."""
        job = self._job(request)
        if not self._streams.acquire(blocking=False):
            raise Overloaded(
                f"{self._max_streams} training streams are open on this replica (half of "
                "serve.max_ongoing_requests, so other calls are served): poll GetTrainingStatus instead"
            )
        try:
            ends, last = time.monotonic() + self.config.serve.request_timeout_s, None
            while True:
                job = self.service.status(job.job_id, job.run_id) or job
                current = (job.state, job.step, len(job.losses))
                if current != last:
                    yield _status(job)
                    last = current
                if job.state in _FINAL or time.monotonic() > ends:
                    return
                time.sleep(self.config.training.poll_interval_s)
        finally:
            self._streams.release()

    @grpc_method(trainer_pb2.TrainingStatus)
    def CancelTraining(self, request: trainer_pb2.GetTrainingStatusRequest):
        job = self._job(request)
        self.service.cancel(job.job_id, job.run_id)
        return _status(job)


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    # Training runs as Ray jobs, so the trainer replica itself needs no CPU and holds no state.
    options = replica_options(config, "trainer", num_cpus=0)
    return TrainerDeployment.options(**options).bind(config.model_dump())
