"""Experiment tracking in MLflow: one MLflow run per reinstruct run, one nested run per round.

`TrackingReporter.around(reporter, config, run_id)` wraps the driver's Reporter: `session()` opens the
MLflow run (or finds it again) and closes it, `stage_done` logs what the stage committed, read back
from the manifest as its typed result, so MLflow holds exactly what the manifest holds. The training
job logs its loss per step from rank 0 into the round's run, which the driver names in its request
(`loss_log`; services/trainer/loss_log.py).

Logging is idempotent, which is what makes a resumed run continue the same MLflow run:
- the MLflow run ids live in the manifest (`mlflow`), and the runs carry `reinstruct.run_id` and
  `reinstruct.round` tags, by which they are found again if the manifest never got an id;
- per-round metrics have step = round and the stage's commit time as timestamp: MLflow's SQL store
  drops a metric identical in key, step, timestamp and value, so logging a stage twice adds nothing;
- a stage gets its `reinstruct.logged.<stage>` tag on the round's run after everything it logs, and
  a stage so tagged is skipped (a crash in between repeats only logs that MLflow drops as identical).
Tracking never fails a run. MLflow's own HTTP retries are turned off (they hold a call for minutes);
a failed call is a warning, the stage stays queued, the queue is tried again at later callbacks with
exponential backoff and for tracking.flush_timeout_s at the end. What is still unlogged is named in
the manifest (`mlflow.unlogged`) and logged by the next run of the same run id, which goes over every
committed stage again, or by `python -m ray_jobs.tracking --store-root ROOT --run-id ID`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from ray_jobs.manifest import STAGE_KINDS, Decision, Filtered, StageResult, Tested, Trained
from services.api import trainer_pb2
from services.common.config import ReinstructConfig, parse_config
from services.common.store import RunStore
from services.common.tracking_server import local_root, quiet_http, tracking_uri

from .run import Reporter

__all__ = ["TrackingReporter", "loss_log", "tracking_uri", "ui_command"]

log = logging.getLogger("reinstruct.tracking")

TRAINING_STAGES = {"model": "train", "control_model": "control_train", "backward_model": "backward_train"}

# Lists in stage results that are intervals (stages.py: "estimate, low, high" or "low, high"); every
# other list is per-item data (losses, task ids, ROUGE-L per candidate), logged otherwise or not at all.
_ELH, _LH = ("estimate", "low", "high"), ("low", "high")
_INTERVALS = {
    "gain": _ELH,
    "score_difference": _ELH,
    "length_controlled_score_difference": _ELH,
    "difference": _ELH,
    "nll_gain": _ELH,
    "length_controlled_difference": _ELH,
    "over_control": _ELH,
    "nll_gain_over_control": _ELH,
    "candidate_interval": _LH,
    "candidate_score_interval": _LH,
}
_MAX_TAG = 5000  # MLflow allows 8000; a URI list or a long reason is cut well before
_MAX_PARAM = 6000
# Errors that a retry cannot fix (a value MLflow refuses): the item is dropped with a warning and
# named as unlogged, instead of holding every later item in the queue forever.
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST", "INVALID_STATE"}


def ui_command(uri: str) -> str:
    """What a user runs to look at a store without a server (a server's URI is its UI)."""
    return "" if uri.startswith(("http://", "https://")) else f"mlflow ui --backend-store-uri {uri}"


def _artifact_location(config: ReinstructConfig, uri: str) -> str | None:
    """A store written without a server keeps artifacts beside the run store (MLflow's default is
    ./mlruns in whatever directory the driver happens to run); a server chooses its own."""
    root = local_root(config.store.root)
    if uri.startswith(("http://", "https://", "databricks")) or root is None:
        return None
    return f"file://{root}/mlflow-artifacts/{config.tracking.experiment}"


def _key(*parts: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", ".".join(parts))[:250]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def flat_params(config: ReinstructConfig) -> dict[str, str]:
    """config.model_dump() flattened to dotted keys, values as the YAML would spell them (JSON)."""
    params: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else key, item)
        else:
            params[prefix] = (value if isinstance(value, str) else json.dumps(value))[:_MAX_PARAM]

    visit("", config.model_dump())
    return params


def stage_values(name: str, result: StageResult) -> tuple[dict[str, float], dict[str, str]]:
    """A stage's numbers as metrics and its strings (URIs, reasons, raters) as tags, keyed
    `<stage>.<field>`: intervals as .estimate/.low/.high, dicts of numbers per key, the filter's
    funnel as removed counts and shares of the candidates, the gate's comparisons per opponent."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}

    def visit(prefix: tuple[str, ...], data: dict[str, Any]) -> None:
        for field, value in data.items():
            key = (*prefix, field)
            if (number := _number(value)) is not None:
                metrics[_key(*key)] = number
            elif isinstance(value, str):
                if value:
                    tags[_key(*key)] = value[:_MAX_TAG]
            elif isinstance(value, list) and field in _INTERVALS and len(value) == len(_INTERVALS[field]):
                for part, item in zip(_INTERVALS[field], value):
                    if (number := _number(item)) is not None:
                        metrics[_key(*key, part)] = number
            elif isinstance(value, dict) and value and all(_number(v) is not None for v in value.values()):
                for item, number in value.items():
                    metrics[_key(*key, str(item))] = float(number)

    data = result.to_dict()
    comparisons = data.pop("comparisons", [])
    funnel = data.pop("funnel", None)
    data.pop("benchmarks", None)
    visit((name,), data)
    for gate in comparisons:
        gate = {k: v for k, v in gate.items() if k != "elapsed_s"}
        visit((name, str(gate.pop("against", "") or "gate")), gate)
    if isinstance(result, Filtered):
        for rule, removed in (funnel or {}).items():
            metrics[_key(name, "removed", rule)] = float(removed)
            if result.candidates:
                metrics[_key(name, "removed_share", rule)] = removed / result.candidates
        if result.candidates:
            metrics[_key(name, "kept_of_candidates")] = result.kept_count / result.candidates
    if isinstance(result, Tested):  # standard benchmarks: benchmark/<task>/<metric>/<model>
        for b in result.benchmark_results():
            for metric, value in b.metrics.items():
                metrics[_key(f"benchmark/{b.task}/{metric}/{b.model}")] = value
                if metric in b.stderrs:
                    metrics[_key(f"benchmark/{b.task}/{metric}_stderr/{b.model}")] = b.stderrs[metric]
    return metrics, tags


def _transient(exc: Exception) -> bool:
    code = getattr(exc, "error_code", None)
    return not (isinstance(code, str) and code in _PERMANENT)


class TrackingReporter(Reporter):
    """A Reporter that logs the run to MLflow and passes every call on to the reporter it wraps.
    With tracking.enabled false (or no URI to log to) it only passes calls on."""

    @classmethod
    def around(cls, reporter: Reporter, config: ReinstructConfig, run_id: str) -> TrackingReporter:
        return reporter if isinstance(reporter, cls) else cls(reporter, config, run_id)

    def __init__(self, inner: Reporter, config: ReinstructConfig, run_id: str) -> None:
        self.inner, self.config, self.run_id = inner, config, run_id
        self.enabled = config.tracking.enabled
        self.uri: str | None = None
        self._client = None
        self._store: RunStore | None = None
        self._ids: dict[str, Any] = {}
        self._pending: list[tuple] = []
        self._dropped: list[str] = []
        self._round_logged: dict[int, set[str]] = {}
        self._failures, self._next_try, self._depth = 0, 0.0, 0
        self._manifest: dict | None = None

    def __getattr__(self, name: str) -> Any:  # what a caller's own reporter adds (report_uri, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # ---- the Reporter's calls ------------------------------------------------------------------
    def stage(self, round_index: int, stage: str, resumed: bool) -> None:
        self.inner.stage(round_index, stage, resumed)
        if self._client is not None and not resumed and str(round_index) not in self._ids.get("rounds", {}):
            self._queue(("round", round_index))  # before training: the job logs its loss to this run
            self._flush()

    def stage_done(self, round_index: int, stage: str, output: dict) -> None:
        self.inner.stage_done(round_index, stage, output)
        if self._client is not None:
            self._queue(("stage", round_index, stage))
            self._flush()

    def training(self, round_index: int, step: int, total: int, loss: float) -> None:
        self.inner.training(round_index, step, total, loss)

    def evaluation(self, round_index: int, done: int, total: int) -> None:
        self.inner.evaluation(round_index, done, total)

    def shards(self, round_index: int, stage: str, done: int, total: int) -> None:
        self.inner.shards(round_index, stage, done, total)

    def report(self, uri: str) -> None:
        self.inner.report(uri)
        if self._client is not None:
            self._pending = [item for item in self._pending if item[0] != "report"]
            self._queue(("report", uri))
            self._flush()

    # ---- the session ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[TrackingReporter]:
        """Opens (or continues) the run's MLflow run; at the end logs what is queued and closes it as
        FINISHED, FAILED (an exception) or KILLED (Ctrl-C). Reentrant: an inner session is the outer one."""
        self._depth += 1
        if self._depth > 1 or not self.enabled:
            try:
                yield self
            finally:
                self._depth -= 1
            return
        try:
            self._open()
        except Exception as exc:  # a bad URI, a store error: the run goes on untracked
            log.warning("tracking: could not open the MLflow run (%s); not tracking this run", exc)
            self._client = None
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._depth -= 1
            self._close(status)

    def _open(self) -> None:
        self.uri = tracking_uri(self.config)
        if self.uri is None:
            log.warning(
                "tracking: store.root %s is not a local path and tracking.uri is unset; not tracking this run",
                self.config.store.root,
            )
            return
        try:
            from mlflow import MlflowClient
        except ImportError as exc:  # a venv without mlflow: no tracking, the run goes on
            log.warning("tracking: mlflow is not installed (%s); not tracking this run", exc)
            return
        quiet_http(self.config.tracking.request_timeout_s)
        self._store = RunStore(self.config.store.root, self.config.store.allowed_schemes)
        manifest = self._store.load_manifest(self.run_id)
        known = manifest.get("mlflow") or {}
        if known.get("tracking_uri") == self.uri:  # ids from another store mean nothing here
            self._ids = {"rounds": {}, **{k: known[k] for k in ("experiment_id", "run_id", "rounds") if k in known}}
        else:
            self._ids = {"rounds": {}}
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._queue(("open",))
        for key in sorted(manifest.get("rounds", {}), key=int):  # what earlier sessions committed
            for stage in manifest["rounds"][key].get("stages", {}):
                self._queue(("stage", int(key), stage))
        self._flush()

    def _close(self, status: str) -> None:
        if self._client is None:
            return
        try:
            self._finish(status)
        except Exception as exc:  # never the run's failure
            log.warning("tracking: closing the MLflow run failed (%s)", exc)
        finally:
            self._client = None

    def _finish(self, status: str) -> None:
        self._queue(("close", status))
        deadline = time.monotonic() + self.config.tracking.flush_timeout_s
        while not self._flush(force=True) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._next_try, deadline) - time.monotonic()))
        unlogged = [self._describe(item) for item in self._pending if item[0] == "stage"] + self._dropped
        if self._pending:
            log.warning(
                "tracking: %d item(s) could not be logged to %s (%s); the manifest names them and the next "
                "run of %s logs them",
                len(self._pending),
                self.uri,
                ", ".join(self._describe(item) for item in self._pending),
                self.run_id,
            )
        elif self._ids.get("run_id"):
            log.info(
                "tracking: MLflow run %s in %s%s",
                self._ids["run_id"],
                self.uri,
                f" (to look at it: {ui_command(self.uri)})" if ui_command(self.uri) else "",
            )
        self._persist(unlogged=unlogged)

    # ---- the queue -----------------------------------------------------------------------------
    def _queue(self, item: tuple) -> None:
        if item not in self._pending:
            self._pending.append(item)

    @staticmethod
    def _describe(item: tuple) -> str:
        return f"round {item[1]}: {item[2]}" if item[0] == "stage" else str(item[0])

    def _flush(self, force: bool = False) -> bool:
        """Logs the queue in order; on an error stops, keeping the rest, and waits a backoff (1, 2, 4 ..
        tracking.max_backoff_s seconds) before the next try. True when the queue is empty."""
        if not self._pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        self._manifest = None  # read once per flush: the stages' outputs do not change meanwhile
        while self._pending:
            item = self._pending[0]
            try:
                self._log(item)
            except Exception as exc:
                if not _transient(exc) and item[0] == "open":
                    log.warning("tracking: MLflow refused to open the run (%s); not tracking this run", exc)
                    self._pending, self._client = [], None
                    return True
                if not _transient(exc):
                    log.warning("tracking: %s refused by MLflow, not logged: %s", self._describe(item), exc)
                    self._dropped.append(self._describe(item))
                    self._pending.pop(0)
                    continue
                self._failures += 1
                self._next_try = time.monotonic() + min(2.0 ** (self._failures - 1), self.config.tracking.max_backoff_s)
                (log.warning if self._failures == 1 else log.debug)(
                    "tracking: MLflow at %s failed (%s: %s); the run goes on, %d item(s) queued, retried with backoff",
                    self.uri,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:300] if str(exc) else "",
                    len(self._pending),
                )
                self._persist()
                return False
            self._pending.pop(0)
        if self._failures:
            log.warning("tracking: MLflow at %s is reachable again; everything queued is logged", self.uri)
        self._failures, self._next_try = 0, 0.0
        self._persist()
        return True

    def _persist(self, **extra: Any) -> None:
        """The MLflow ids into the manifest (from the driver's thread, like every manifest write)."""
        if self._store is None:
            return
        state = {"tracking_uri": self.uri, **self._ids, **extra}
        if ui := ui_command(self.uri or ""):
            state["ui"] = ui
        try:
            previous = self._store.load_manifest(self.run_id).get("mlflow") or {}
            if "unlogged" not in extra and "unlogged" in previous:
                state["unlogged"] = previous["unlogged"]
            if previous != state:
                self._store.update_run(self.run_id, mlflow=state)
        except Exception as exc:  # the next call writes it again
            log.warning("tracking: could not write the MLflow ids into the manifest (%s)", exc)

    def _stage_output(self, k: int, name: str) -> dict | None:
        if self._manifest is None:
            self._manifest = self._store.load_manifest(self.run_id)
        return self._manifest.get("rounds", {}).get(str(k), {}).get("stages", {}).get(name)

    # ---- what each item logs -------------------------------------------------------------------
    def _log(self, item: tuple) -> None:
        kind = item[0]
        if kind == "open":
            self._open_run()
        elif kind == "round":
            self._round_run(item[1])
        elif kind == "stage":
            self._log_stage(item[1], item[2])
        elif kind == "report":
            self._log_artifacts(item[1])
        elif kind == "close":
            for run in self._ids.get("rounds", {}).values():
                self._client.set_terminated(run, item[1])
            manifest = self._store.load_manifest(self.run_id)
            tags = {
                "reinstruct.status": manifest.get("status", ""),
                "reinstruct.final_model": manifest.get("final_model"),
            }
            for key, value in tags.items():
                if value:
                    self._client.set_tag(self._ids["run_id"], key, str(value)[:_MAX_TAG])
            self._log_artifacts(None)
            self._client.set_terminated(self._ids["run_id"], item[1])

    def _experiment(self) -> str:
        if self._ids.get("experiment_id"):
            return self._ids["experiment_id"]
        name = self.config.tracking.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = self._client.create_experiment(
                    name,
                    artifact_location=_artifact_location(self.config, self.uri),
                    # the UI opens it on its runs (model training), not on GenAI traces
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            except Exception as exc:  # another run created it first
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self._client.get_experiment_by_name(name).experiment_id
        else:
            if experiment.lifecycle_stage == "deleted":
                self._client.restore_experiment(experiment.experiment_id)
            experiment_id = experiment.experiment_id
        self._ids["experiment_id"] = experiment_id
        return experiment_id

    def _find(self, round_index: int | None = None) -> str | None:
        """The run (or round k's run) an earlier session created, if the manifest lost its id: a
        reinstruct run is its store's run directory, so two stores with a run "demo" stay apart."""
        if round_index is None:
            query = (
                f"tags.`reinstruct.kind` = 'run' and tags.`reinstruct.run_id` = '{_quote(self.run_id)}' "
                f"and tags.`reinstruct.store` = '{_quote(self._store.uri(self.run_id))}'"
            )
        else:
            query = f"tags.`mlflow.parentRunId` = '{self._ids['run_id']}' and tags.`reinstruct.round` = '{round_index}'"
        runs = self._client.search_runs([self._experiment()], query, max_results=1, order_by=["attributes.start_time"])
        return runs[0].info.run_id if runs else None

    def _exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self._client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def _open_run(self) -> None:
        experiment = self._experiment()
        run_id = self._ids.get("run_id")
        if not self._exists(run_id):
            run_id = (
                self._find()
                or self._client.create_run(
                    experiment,
                    run_name=self.run_id,
                    tags={
                        "reinstruct.run_id": self.run_id,
                        "reinstruct.kind": "run",
                        "reinstruct.base_model": self.config.model.base,
                        "reinstruct.store": self._store.uri(self.run_id),
                    },
                ).info.run_id
            )
            self._ids["run_id"], self._ids["rounds"] = run_id, {}
        self._client.update_run(run_id, status="RUNNING")
        self._persist()
        # params are write-once in MLflow: a resumed run with a changed config keeps the first values
        # as params and says which changed (tag), with the new config as an artifact
        logged = self._client.get_run(run_id).data.params
        params = flat_params(self.config)
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        new = [(k, v) for k, v in params.items() if k not in logged]
        from mlflow.entities import Param

        for start in range(0, len(new), 100):
            self._client.log_batch(run_id, params=[Param(k, v) for k, v in new[start : start + 100]])
        if changed:
            self._client.set_tag(run_id, "reinstruct.config_changed_on_resume", ", ".join(changed)[:_MAX_TAG])
            self._client.log_dict(run_id, self.config.model_dump(), f"config-resumed-{int(time.time())}.json")
        elif new:
            self._client.log_dict(run_id, self.config.model_dump(), "config.json")

    def _round_run(self, k: int) -> str:
        rounds = self._ids.setdefault("rounds", {})
        run_id = rounds.get(str(k))
        if run_id is None:
            run_id = (
                self._find(k)
                or self._client.create_run(
                    self._experiment(),
                    run_name=f"{self.run_id} round {k}",
                    tags={
                        "mlflow.parentRunId": self._ids["run_id"],
                        "reinstruct.run_id": self.run_id,
                        "reinstruct.kind": "round",
                        "reinstruct.round": str(k),
                    },
                ).info.run_id
            )
            rounds[str(k)] = run_id
            self._persist()
        if k not in self._round_logged:
            tags = self._client.get_run(run_id).data.tags
            self._round_logged[k] = {
                t.removeprefix("reinstruct.logged.") for t in tags if t.startswith("reinstruct.logged.")
            }
        return run_id

    def _log_stage(self, k: int, name: str) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._round_run(k)
        if name in self._round_logged[k]:
            return
        output = self._stage_output(k, name)
        if output is None:
            return
        result = STAGE_KINDS.get(name, StageResult).from_dict(output)
        timestamp = int(output.get("committed_at", time.time()) * 1000)
        values, strings = stage_values(name, result)
        metrics = [Metric(key, value, timestamp, k) for key, value in values.items() if not math.isinf(value)]
        for start in range(0, len(metrics), 1000):  # the run's curves over rounds
            self._client.log_batch(self._ids["run_id"], metrics=metrics[start : start + 1000])
        if isinstance(result, Trained) and result.losses:
            self._fill_losses(run_id, f"{name}.loss", result.losses, timestamp)
        if isinstance(result, Filtered):
            self._log_sample(run_id, name, result)
        if isinstance(result, Decision):
            self._log_decision(k, run_id, result)
        for start in range(0, len(metrics), 1000):  # the round's own columns in the runs table
            self._client.log_batch(run_id, metrics=metrics[start : start + 1000])
        tags = [RunTag(key, value) for key, value in strings.items()]
        for start in range(0, len(tags), 100):
            self._client.log_batch(run_id, tags=tags[start : start + 100])
        # last: the stage counts as logged only once everything above is in
        self._client.set_tag(run_id, f"reinstruct.logged.{name}", str(output.get("committed_at", "")))
        self._round_logged[k].add(name)

    def _fill_losses(self, run_id: str, key: str, losses: list[float], timestamp: int) -> None:
        """The steps the training job did not log itself (no server then, or no tracking in the job)."""
        from mlflow.entities import Metric

        logged = {m.step for m in self._client.get_metric_history(run_id, key)}
        missing = [Metric(key, loss, timestamp, step) for step, loss in enumerate(losses, 1) if step not in logged]
        for start in range(0, len(missing), 1000):
            self._client.log_batch(run_id, metrics=missing[start : start + 1000])

    def _log_sample(self, run_id: str, name: str, result: Filtered) -> None:
        """A table of kept and rejected tasks, with the filter's verdicts (the UI shows it as a table)."""
        artifact = f"{name}_sample.json"
        n = self.config.tracking.sample_tasks
        if not n or any(f.path == artifact for f in self._client.list_artifacts(run_id)):
            return  # log_table appends: logged once
        rows = []
        for uri, count in ((result.kept_uri, result.kept_count), (result.rejected_uri, 1)):
            if not uri or not count or not self._store.exists(uri):
                continue
            for task in self._store.read_tasks(uri)[:n]:
                first = task.instances[0] if task.instances else None
                rows.append(
                    {
                        "id": task.id,
                        "verdict": task.lineage.filter.label if task.lineage.filter else "",
                        "instruction": task.instruction,
                        "input": first.input if first else "",
                        "output": first.output if first else "",
                        "instances": len(task.instances),
                        "stage": task.lineage.stage,
                    }
                )
        if rows:
            self._client.log_table(run_id, {key: [r[key] for r in rows] for key in rows[0]}, artifact)

    def _log_decision(self, k: int, run_id: str, decision: Decision) -> None:
        parent = self._ids["run_id"]
        self._client.set_tag(parent, "reinstruct.promoted_model", decision.model_uri[:_MAX_TAG])
        name = self.config.tracking.registered_model
        trained = self._stage_output(k, "train")
        if not (decision.promoted and name and trained):  # model 0 without bootstrap is model.base itself
            return
        if self._client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{run_id}'"):
            return
        incumbent = self._stage_output(k - 1, "promote") if k else None
        parent_model = incumbent["model_uri"] if incumbent else trained.get("base_model", "")
        tags = {
            "reinstruct.run_id": self.run_id,
            "reinstruct.round": str(k),
            "reinstruct.model_uri": decision.model_uri,
            "reinstruct.parent_model": parent_model,
            "reinstruct.fine_tuned_from": trained.get("base_model", ""),
            "reinstruct.mlflow_run": parent,
        }
        parent_run = self._ids.get("rounds", {}).get(str(k - 1))
        if parent_run and (
            earlier := self._client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{parent_run}'")
        ):
            tags["reinstruct.parent_version"] = str(earlier[0].version)
        # the weights stay in the run store: the version points at a small artifact naming the
        # checkpoint (a tracking server refuses a local path as a version's source)
        self._client.log_dict(run_id, {"model_uri": decision.model_uri, **tags}, "promoted_model/checkpoint.json")
        try:
            self._client.create_registered_model(name, description="Models reinstruct promoted, one version each")
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        self._client.create_model_version(
            name,
            f"runs:/{run_id}/promoted_model",
            run_id=run_id,
            tags={key: value[:_MAX_TAG] for key, value in tags.items() if value},
            description=f"round {k} of reinstruct run {self.run_id}: {decision.reason}"[:_MAX_TAG],
            await_creation_for=0,
        )

    def _log_artifacts(self, report_uri: str | None) -> None:
        """The report and the manifest, replaced by their newest versions."""
        with tempfile.TemporaryDirectory() as directory:
            files = [("manifest.json", self._store.manifest_uri(self.run_id))]
            if report_uri:
                files.append(("report.html", report_uri))
            for filename, uri in files:
                if self._store.exists(uri):
                    path = os.path.join(directory, filename)
                    with open(path, "wb") as handle:
                        handle.write(self._store.read_bytes(uri))
                    self._client.log_artifact(self._ids["run_id"], path)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# ---- the training request's loss log -------------------------------------------------------------
def loss_log(
    store: RunStore, config: ReinstructConfig, run_id: str, k: int, model_uri: str
) -> trainer_pb2.LossLog | None:
    """Where the training job of round k writing model_uri logs its loss per step: the round's MLflow
    run, as this driver's tracker put it in the manifest. None: tracking is off, the manifest's runs
    are another server's (a resumed run whose tracking.uri changed), or the round's run is not known."""
    known = store.load_manifest(run_id).get("mlflow") or {}
    round_run = known.get("rounds", {}).get(str(k))
    uri = tracking_uri(config)
    if not (config.tracking.enabled and round_run and uri and known.get("tracking_uri") == uri):
        return None
    stage = TRAINING_STAGES.get(model_uri.rstrip("/").rsplit("/", 1)[-1], "train")
    return trainer_pb2.LossLog(tracking_uri=uri, mlflow_run_id=round_run, metric_key=f"{stage}.loss")


def main(argv: list[str] | None = None) -> int:
    """Logs a run's committed stages that MLflow does not have yet (not while its driver runs)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--store-root", required=True)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    manifest = RunStore(args.store_root).load_manifest(args.run_id)
    config = parse_config(manifest.get("config"), "manifest config")
    config.store.root = args.store_root
    reporter = TrackingReporter(Reporter(), config, args.run_id)
    if reporter.enabled:
        reporter._open()
        reporter._close("FINISHED" if manifest.get("status") == "succeeded" else "FAILED")
    return 1 if (RunStore(args.store_root).load_manifest(args.run_id).get("mlflow") or {}).get("unlogged") else 0


if __name__ == "__main__":
    sys.exit(main())
