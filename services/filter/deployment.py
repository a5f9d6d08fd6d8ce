"""Ray Serve deployment of the filter (gRPC). Validation and proto conversion only."""

from __future__ import annotations

from ray import serve

from ..api import common_pb2, filter_pb2
from ..common.config import ReinstructConfig, config_from_app_args, replica_options
from ..common.convert import task_to_proto
from ..common.grpc_handler import grpc_method, refuse_other_services
from ..common.store import RunStore
from ..common.validation import RequestError, check_context, check_output_uri, check_range, resolve_tasks
from .service import FilterSettings, filter_tasks


@serve.deployment(name="Filter")
@refuse_other_services("Filter")
class FilterDeployment:
    def __init__(self, settings: dict):
        self.config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(self.config.store.root, self.config.store.allowed_schemes)

    @grpc_method(filter_pb2.FilterTasksResponse)
    def FilterTasks(self, request: filter_pb2.FilterTasksRequest):
        check_context(request.context)
        defaults = self.config.filter
        threshold = request.rouge_l_threshold or defaults.rouge_l_threshold
        check_range(threshold, "rouge_l_threshold", 1e-9, 1.0)
        min_words = request.min_instruction_words or defaults.min_instruction_words
        max_words = request.max_instruction_words or defaults.max_instruction_words
        check_range(min_words, "min_instruction_words", 1, 10_000)
        check_range(max_words, "max_instruction_words", 1, 10_000)
        if min_words > max_words:
            raise RequestError("min_instruction_words", "must not exceed max_instruction_words")
        run_id = request.context.run_id
        check_output_uri(request.kept_uri, self.store, "kept_uri", run_id)
        check_output_uri(request.rejected_uri, self.store, "rejected_uri", run_id)
        candidates = resolve_tasks(request.candidates, self.store, "candidates")
        pool = resolve_tasks(request.pool, self.store, "pool", required=False)
        eval_tasks = resolve_tasks(request.decontaminate_against, self.store, "decontaminate_against", required=False)
        ngram = request.decontamination_ngram or defaults.decontamination_ngram
        check_range(ngram, "decontamination_ngram", 4, 64)
        near = request.near_duplicate_threshold or defaults.near_duplicate_threshold  # negative: off
        check_range(near, "near_duplicate_threshold", -1.0, 1.0)
        check_range(request.min_curation_score, "min_curation_score", 0.0, 5.0)
        settings = FilterSettings(
            threshold,
            min_words,
            max_words,
            reject_only_above_threshold=request.reject_only_above_threshold,
            near_duplicate_threshold=near if near > 0 else None,
            decontamination_ngram=ngram,
            min_curation_score=request.min_curation_score,
            max_instances_per_task=defaults.max_instances_per_task,
            check_instances=not request.instructions_only,
        )
        result = filter_tasks(candidates, pool, settings, eval_tasks)
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


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    return FilterDeployment.options(**replica_options(config)).bind(config.model_dump())
