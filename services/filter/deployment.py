"""Ray Serve deployment of the filter (gRPC). Validation and proto conversion only."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ray import serve

from ..api import common_pb2, filter_pb2
from ..common.config import FilterConfig, ReinstructConfig, config_from_app_args, replica_options
from ..common.convert import task_to_proto
from ..common.grpc_handler import grpc_method, refuse_other_services
from ..common.rouge import NoveltyIndex, tokenize
from ..common.sections import from_message
from ..common.store import RunStore
from ..common.validation import (
    RequestError,
    check_context,
    check_output_uri,
    check_range,
    check_rouge_cost,
    resolve_tasks,
)
from .service import PoolScore, filter_tasks, novelty_scores


def _pool_scores(request: filter_pb2.FilterTasksRequest, candidates) -> list[PoolScore] | None:
    if not request.pool_scores:
        return None
    if len(request.pool_scores) != len(candidates):
        raise RequestError(
            "pool_scores",
            f"has {len(request.pool_scores)} scores for {len(candidates)} candidates (one each, in order)",
        )
    out = []
    for i, (score, task) in enumerate(zip(request.pool_scores, candidates)):
        if score.task_id != task.id:
            raise RequestError(f"pool_scores[{i}].task_id", f"is {score.task_id!r}; candidate {i} is {task.id!r}")
        check_range(score.max_rouge_l, f"pool_scores[{i}].max_rouge_l", 0.0, 1.0)
        out.append(PoolScore(score.max_rouge_l, score.nearest_instruction))
    return out


@serve.deployment(name="Filter")
@refuse_other_services("Filter")
class FilterDeployment:
    def __init__(self, settings: dict):
        self.config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(self.config.store.root, self.config.store.allowed_schemes)
        self.request_budget_s = self.config.serve.request_timeout_s  # work past it is abandoned (deadline.py)
        self.serve_host = self.config.serve.host  # without a token, gRPC answers loopback clients only
        # the pools ScoreNovelty saw last, by file and version: a stage's shards share one pool, and
        # indexing it again for every shard would cost more than the shard's comparisons
        self._pool_indexes: OrderedDict[tuple[str, str], NoveltyIndex] = OrderedDict()
        self._pool_lock = threading.Lock()

    def _pool_index(self, source) -> NoveltyIndex:
        """The request's pool as an index; a pool file's index is kept (the two most recent)."""
        if source.WhichOneof("source") != "uri":
            return NoveltyIndex([t.instruction for t in resolve_tasks(source, self.store, "pool")])
        try:
            path = self.store.resolve(source.uri, "pool.uri")
            info = self.store.fs.info(path)
            version = info.get("mtime") or info.get("ETag") or info.get("LastModified") or ""
            key = (path, f"{version}/{info.get('size')}" if version else "")
        except (OSError, ValueError):
            key = ("", "")  # resolve_tasks names the problem
        index = self._pool_indexes.get(key) if key[1] else None
        if index is None:
            tasks = resolve_tasks(source, self.store, "pool")
            index = NoveltyIndex([t.instruction for t in tasks])
            if key[1]:
                self._pool_indexes[key] = index
                while len(self._pool_indexes) > 2:
                    self._pool_indexes.popitem(last=False)
        return index

    @grpc_method(filter_pb2.FilterTasksResponse)
    def FilterTasks(self, request: filter_pb2.FilterTasksRequest):
        check_context(request.context)
        cfg = from_message(request.filter, FilterConfig, "filter")
        run_id = request.context.run_id
        check_output_uri(request.kept_uri, self.store, "kept_uri", run_id)
        check_output_uri(request.rejected_uri, self.store, "rejected_uri", run_id)
        candidates = resolve_tasks(request.candidates, self.store, "candidates")
        pool = resolve_tasks(request.pool, self.store, "pool", required=False)
        eval_tasks = resolve_tasks(request.decontaminate_against, self.store, "decontaminate_against", required=False)
        pool_scores = _pool_scores(request, candidates)
        pool_tokens = sum(len(tokenize(t.instruction)) for t in pool) if pool_scores is None else 0
        check_rouge_cost(candidates, pool_tokens, candidates_join_pool=True)
        result = filter_tasks(
            candidates, pool, cfg, eval_tasks, check_instances=not request.instructions_only, pool_scores=pool_scores
        )
        response = filter_pb2.FilterTasksResponse(
            verdicts=[
                filter_pb2.Verdict(
                    task_id=v.task_id,
                    kept=v.kept,
                    reasons=v.reasons,
                    max_rouge_l=v.max_rouge_l,
                    nearest_instruction=v.nearest_instruction,
                )
                for v in result.verdicts
            ],
            funnel=[filter_pb2.FunnelStep(rule=rule, removed=n) for rule, n in sorted(result.funnel.items())],
            candidates=len(candidates),
            kept_count=len(result.kept),
        )
        if request.kept_uri:
            count = self.store.write_output(request.kept_uri, run_id, result.kept, "kept_uri")
            response.kept_ref.CopyFrom(common_pb2.DatasetRef(uri=request.kept_uri, count=count))
        else:
            response.kept.extend(task_to_proto(t) for t in result.kept)
        if request.rejected_uri:
            count = self.store.write_output(request.rejected_uri, run_id, result.rejected, "rejected_uri")
            response.rejected_ref.CopyFrom(common_pb2.DatasetRef(uri=request.rejected_uri, count=count))
        return response

    @grpc_method(filter_pb2.ScoreNoveltyResponse)
    def ScoreNovelty(self, request: filter_pb2.ScoreNoveltyRequest):
        check_context(request.context)
        candidates = resolve_tasks(request.candidates, self.store, "candidates")
        if not request.pool.WhichOneof("source"):
            raise RequestError("pool", "give the pool inline or a dataset uri")
        with self._pool_lock:  # a kept index is shared by this replica's requests (its token table grows)
            index = self._pool_index(request.pool)
            check_rouge_cost(candidates, index.token_count, candidates_join_pool=False)
            scores = novelty_scores(candidates, index)
        return filter_pb2.ScoreNoveltyResponse(
            scores=[
                filter_pb2.NoveltyScore(
                    task_id=t.id, max_rouge_l=s.max_rouge_l, nearest_instruction=s.nearest_instruction
                )
                for t, s in zip(candidates, scores)
            ]
        )


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    return FilterDeployment.options(**replica_options(config, "filter")).bind(config.model_dump())
