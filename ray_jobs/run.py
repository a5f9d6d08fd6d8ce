"""What every stage of a run needs: the config, the service clients, the run store, the run's key, and
the rule that a stage committed in the manifest is never redone (that is how a rerun resumes)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ray_jobs.manifest import STAGE_KINDS, Dataset, Result, Split
from services.api import common_pb2, generator_pb2
from services.client import ServiceClients
from services.common.config import ReinstructConfig
from services.common.records import TaskRecord
from services.common.store import RunStore

from .fanout import ShardedStage

log = logging.getLogger("reinstruct.loop")


class Reporter:
    """What the driver tells the outside world; the CLI draws progress bars from these calls."""

    def stage(self, round_index: int, stage: str, resumed: bool) -> None:
        log.info("round %d: %s%s", round_index, stage, " (committed earlier, skipped)" if resumed else "")

    def stage_done(self, round_index: int, stage: str, output: dict) -> None:
        log.info(
            "round %d: %s done: %s",
            round_index,
            stage,
            {k: v for k, v in output.items() if not isinstance(v, (list, dict))},
        )

    def training(self, round_index: int, step: int, total: int, loss: float) -> None:
        pass

    def evaluation(self, round_index: int, done: int, total: int) -> None:
        pass

    def shards(self, round_index: int, stage: str, done: int, total: int) -> None:
        log.debug("round %d: %s: %d of %d shards in", round_index, stage, done, total)

    def report(self, uri: str) -> None:
        log.info("report: %s", uri)


def _check_kind(name: str, kind: type) -> None:
    """A stage commits the kind STAGE_KINDS names for it: what the manifest's readers expect."""
    if STAGE_KINDS.get(name) is not kind:
        raise TypeError(f"stage {name!r} is registered as {STAGE_KINDS.get(name)}, not {kind.__name__}")


@dataclass
class Run:
    config: ReinstructConfig
    clients: ServiceClients
    run_id: str
    reporter: Reporter = field(default_factory=Reporter)

    def __post_init__(self) -> None:
        self.store = RunStore(self.config.store.root, self.config.store.allowed_schemes)

    def stage(self, k: int, name: str, work: Callable[[], Result], kind: type[Result]) -> Result:
        """Runs work unless round k's stage `name` is committed, then commits what it returned."""
        _check_kind(name, kind)
        done = self.store.stage_output(self.run_id, k, name)
        self.reporter.stage(k, name, resumed=done is not None)
        if done is not None:
            return kind.from_dict(done)
        started = time.monotonic()
        result = work()
        result.elapsed_s = round(time.monotonic() - started, 2)
        output = result.to_dict()
        self.store.commit_stage(self.run_id, k, name, output)
        self.reporter.stage_done(k, name, output)
        return result

    def committed(self, k: int, name: str, kind: type[Result]) -> Result | None:
        _check_kind(name, kind)
        done = self.store.stage_output(self.run_id, k, name)
        return kind.from_dict(done) if done is not None else None

    @functools.cached_property
    def run_key(self) -> str:
        """The run's capability: made when this driver creates the run, read back when it resumes it
        (RunStore.claim_run: NotRunOwner if the run is another driver's); every request carries it."""
        return self.store.claim_run(self.run_id)

    def claim(self) -> None:
        """Creates the run, or proves this driver owns it: before the driver touches anything."""
        self.run_key  # noqa: B018 - the property claims once

    def ctx(self, k: int) -> common_pb2.RunContext:
        return common_pb2.RunContext(run_id=self.run_id, round=k, run_key=self.run_key)

    def uri(self, k: int, name: str) -> str:
        return self.store.dataset_uri(self.run_id, k, name)

    def write(self, k: int, name: str, tasks: list[TaskRecord]) -> Dataset:
        uri = self.uri(k, name)
        self.store.write_tasks(uri, tasks)
        return Dataset(uri=uri, count=len(tasks))

    def seed_training_tasks(self, split: Split) -> list[TaskRecord]:
        """The seed tasks every training mix takes (the control's, the rounds', the backward model's):
        each train task with at most training.seed_instances_per_task instances, one per label first."""
        tasks = self.store.read_tasks(split.seed_train_uri)
        cap = self.config.training.seed_instances_per_task
        return [replace(t, instances=_labels_first(t.instances)[:cap]) for t in tasks] if cap else tasks

    def sampling(
        self, max_new_tokens: int, seed: int, temperature: float | None = None, presence_penalty: float = 0.0
    ) -> common_pb2.Sampling:
        g = self.config.generation
        return common_pb2.Sampling(
            temperature=g.temperature if temperature is None else temperature,
            top_p=g.top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            presence_penalty=presence_penalty,
        )

    def in_flight(self, app: str) -> int:
        """Shards in flight for an app: two per replica it may have (one running, the next queued
        behind it, so no replica idles between shards), at most fanout.max_in_flight. More would
        only wait in a replica's queue, their deadlines running."""
        scaling = getattr(self.config.serve, app)
        replicas = scaling.autoscaling.max_replicas if scaling.autoscaling else scaling.replicas
        return max(1, min(self.config.fanout.max_in_flight, 2 * replicas))

    def shard_stage(self, k: int, stage: str, app: str) -> ShardedStage:
        """Stage k's shards, as many in flight as the app's replicas take; a shard whose part another
        request holds (ABORTED) is tried again for as long as that request can run."""
        return ShardedStage(
            self.store, self.run_id, k, stage, self.in_flight(app), self.config.serve.request_timeout_s + 30
        )

    def sharded(self, k: int, stage: str, name: str, previous: Dataset, call: Callable[[str, str], Any]) -> Dataset:
        """The previous stage's tasks in shards of fanout.tasks_per_shard, sent concurrently to the
        generator: call(input_uri, output_uri) is one request. Nothing is sent for an empty input
        (services reject empty batches)."""
        if previous.count == 0:
            return self.write(k, name, [])
        sharded = self.shard_stage(k, stage, "generator")
        shards = sharded.shards(previous.tasks(self.store), self.config.fanout.tasks_per_shard, write_inputs=True)
        responses = sharded.run(
            shards,
            lambda shard: call(shard.input_uri, shard.output_uri),
            generator_pb2.TasksResponse,
            on_shard=lambda done, total: self.reporter.shards(k, stage, done, total),
        )
        uri = self.uri(k, name)
        count = sharded.join([r.output.uri for r in responses], uri)
        return Dataset(uri=uri, count=count, shards=len(shards))


def _labels_first(instances: list) -> list:
    """The instances with the first of each distinct output first, so a capped classification task
    keeps one instance per label before it keeps a second of any."""
    seen, first, rest = set(), [], []
    for instance in instances:
        (rest if instance.output in seen else first).append(instance)
        seen.add(instance.output)
    return first + rest
