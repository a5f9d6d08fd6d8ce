"""Rank 0 of a training job logs its loss per step into the round's MLflow run while it trains. The
driver names the run and the metric (StartTrainingRequest.loss_log); the server is the one this
trainer was deployed with (tracking.uri), never one a request names, and the MLflow run must carry the
job's own reinstruct run and round as tags (a request cannot write into another run's curve)."""

from __future__ import annotations

import math
import sys
import time

from pydantic import BaseModel, ConfigDict

from ..common.tracking_server import quiet_http


class LossTarget(BaseModel):
    """Where the loss goes: the job's spec carries it to every worker (rank 0 uses it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str
    mlflow_run_id: str
    metric_key: str
    timeout_s: int  # tracking.request_timeout_s: one request to the server
    run_id: str  # the reinstruct run the job belongs to: the MLflow run's reinstruct.run_id tag
    round: int  # and its reinstruct.round tag


class StepLogger:
    """Rank 0's loss per step into the round's MLflow run, sent in batches. Never raises: after a
    failed send the steps wait for the next one, tried after a backoff (the driver fills in whatever
    never arrives). A restarted worker group skips the steps logged before it, so no step is doubled."""

    def __init__(self, target: LossTarget) -> None:
        self.target, self._buffer, self._client, self._after = target, [], None, None
        self._failures, self._next_try, self._refused = 0, 0.0, False

    def add(self, step: int, loss: float) -> None:
        if self._after is None or step > self._after:
            self._buffer.append((step, loss, int(time.time() * 1000)))
        del self._buffer[:-100_000]

    def flush(self, force: bool = False) -> None:
        """Sends what is buffered, unless a recent failure asks to wait (force: the last try)."""
        if self._refused or not self._buffer or (time.monotonic() < self._next_try and not force):
            return
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            if self._client is None:
                quiet_http(self.target.timeout_s)
                client = MlflowClient(tracking_uri=self.target.tracking_uri)
                tags = client.get_run(self.target.mlflow_run_id).data.tags
                owner = (tags.get("reinstruct.run_id"), tags.get("reinstruct.round"))
                if owner != (self.target.run_id, str(self.target.round)):
                    self._refused, self._buffer = True, []
                    print(f"tracking: MLflow run {self.target.mlflow_run_id} is not this job's round", file=sys.stderr)
                    return
                history = client.get_metric_history(self.target.mlflow_run_id, self.target.metric_key)
                self._client, self._after = client, max((m.step for m in history), default=0)
                self._buffer = [b for b in self._buffer if b[0] > self._after]
            key = self.target.metric_key
            while self._buffer:
                batch = self._buffer[:1000]
                metrics = [Metric(key, loss, ts, step) for step, loss, ts in batch if not math.isinf(loss)]
                self._client.log_batch(self.target.mlflow_run_id, metrics=metrics)
                del self._buffer[: len(batch)]
            self._failures = 0
        except Exception as exc:
            self._failures += 1
            self._next_try = time.monotonic() + min(2.0**self._failures, 60.0)
            if self._failures == 1:
                print(f"tracking: training loss not logged to MLflow yet ({exc}); training goes on", file=sys.stderr)
