"""gRPC clients for the four services. Serve's proxy picks the app from the `application` metadata
key (the app names are the service names in lower case) and the deployment method by RPC name."""

from __future__ import annotations

import os
import time

import grpc

from .api import evaluator_pb2_grpc, filter_pb2_grpc, generator_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from .common.config import ServeConfig, TrainingConfig
from .common.grpc_handler import ANSWERED_KEY, API_TOKEN_ENV

_TIMEOUT_S = ServeConfig().request_timeout_s  # every default lives in config.py
_POLL_S = TrainingConfig().poll_interval_s

MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _final(stream, on_progress):
    """Reports each progress message of a stream and returns the result the last one carries."""
    for update in stream:
        if on_progress is not None:
            on_progress(update.done, update.total)
        if update.HasField("result"):
            return update.result
    raise RuntimeError("the stream ended without a result")


def _retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE, or INTERNAL that no replica answered: Serve's proxy says INTERNAL when the replica
    serving the call died. An error a replica chose (it carries ANSWERED_KEY) is never retried."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    answered = any(key == ANSWERED_KEY for key, _ in (exc.trailing_metadata() or ()))
    return code == grpc.StatusCode.INTERNAL and not answered


class ServiceClients:
    def __init__(self, target: str, timeout_s: float = _TIMEOUT_S, token: str | None = None, retries: int = 3) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        token = token if token is not None else os.environ.get(API_TOKEN_ENV, "")
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        self.channel = grpc.insecure_channel(target, options=options)
        self._generator = generator_pb2_grpc.GeneratorStub(self.channel)
        self._filter = filter_pb2_grpc.FilterStub(self.channel)
        self._trainer = trainer_pb2_grpc.TrainerStub(self.channel)
        self._evaluator = evaluator_pb2_grpc.EvaluatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, app: str, method, request, timeout_s: float | None = None):
        """Every call has a deadline. Calls whose replica died or was unavailable are retried with the
        same request: every method is idempotent (outputs go to the request's URIs, record ids are
        derived from run, round and position), so a retry never duplicates a record."""
        metadata = (("application", app),) + self._auth
        for attempt in range(self.retries + 1):
            try:
                return method(request, metadata=metadata, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as exc:
                if attempt == self.retries or not _retryable(exc):
                    raise
                time.sleep(min(2.0 * 2**attempt, 20.0))
        raise AssertionError("unreachable")

    def generate_instructions(self, request):
        return self._call("generator", self._generator.GenerateInstructions, request)

    def classify_instructions(self, request):
        return self._call("generator", self._generator.ClassifyInstructions, request)

    def generate_instances(self, request):
        return self._call("generator", self._generator.GenerateInstances, request)

    def backtranslate(self, request):
        return self._call("generator", self._generator.Backtranslate, request)

    def curate_examples(self, request):
        return self._call("generator", self._generator.CurateExamples, request)

    def stream_instances(self, request, on_progress=None):
        """GenerateInstances with progress; returns the final TasksResponse."""
        return _final(self._call("generator", self._generator.StreamInstances, request), on_progress)

    def filter_tasks(self, request):
        return self._call("filter", self._filter.FilterTasks, request)

    def score_novelty(self, request):
        return self._call("filter", self._filter.ScoreNovelty, request)

    def start_training(self, request):
        return self._call("trainer", self._trainer.StartTraining, request, 60)

    def training_status(self, job_id: str, context):
        """context: the job's run (RunContext with its run_key): only the run's owner sees its jobs."""
        request = trainer_pb2.GetTrainingStatusRequest(job_id=job_id, context=context)
        return self._call("trainer", self._trainer.GetTrainingStatus, request, 30)

    def stream_training(self, job_id: str, context):
        request = trainer_pb2.GetTrainingStatusRequest(job_id=job_id, context=context)
        return self._call("trainer", self._trainer.StreamTraining, request)

    def cancel_training(self, job_id: str, context):
        request = trainer_pb2.GetTrainingStatusRequest(job_id=job_id, context=context)
        return self._call("trainer", self._trainer.CancelTraining, request, 30)

    def wait_for_training(self, request, poll_s: float = _POLL_S, on_progress=None, stall_timeout_s: float = 0.0):
        """Starts (or re-attaches to) a training job and polls until it ends. A job that reports no new
        step for stall_timeout_s (0: no bound) is cancelled and the wait fails."""
        status = self.start_training(request)
        last, moved = (status.state, status.step), time.monotonic()
        while status.state in (trainer_pb2.TrainingStatus.PENDING, trainer_pb2.TrainingStatus.RUNNING):
            if on_progress:
                on_progress(status)
            time.sleep(poll_s)
            status = self.training_status(status.job_id, request.context)
            if (status.state, status.step) != last:
                last, moved = (status.state, status.step), time.monotonic()
            elif stall_timeout_s and time.monotonic() - moved > stall_timeout_s:
                self.cancel_training(status.job_id, request.context)
                raise RuntimeError(
                    f"training job {status.job_id} reported no new step in {stall_timeout_s:g} s "
                    f"(training.stall_timeout_s; last at step {status.step} of {status.total_steps}): cancelled"
                )
        if on_progress:
            on_progress(status)
        if status.state != trainer_pb2.TrainingStatus.SUCCEEDED:
            raise RuntimeError(f"training job {status.job_id} failed: {status.error}")
        return status

    def evaluate_model(self, request):
        return self._call("evaluator", self._evaluator.EvaluateModel, request)

    def stream_evaluation(self, request, on_progress=None):
        """Evaluates with progress; returns the final EvaluateModelResponse."""
        return _final(self._call("evaluator", self._evaluator.StreamEvaluation, request), on_progress)

    def compare_models(self, request):
        return self._call("evaluator", self._evaluator.CompareModels, request)

    def decide_promotion(self, request):
        return self._call("evaluator", self._evaluator.DecidePromotion, request)

    def run_benchmarks(self, request):
        return self._call("evaluator", self._evaluator.RunBenchmarks, request)
