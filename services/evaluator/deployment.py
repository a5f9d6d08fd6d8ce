"""Ray Serve deployment of the evaluator (gRPC). Validation and proto conversion only."""

from __future__ import annotations

from ray import serve

from ..api import evaluator_pb2
from ..common.config import ReinstructConfig, config_from_app_args
from ..common.grpc_handler import grpc_method
from ..common.store import RunStore
from ..common.validation import check_context, check_model_uri, check_range, check_sampling, resolve_tasks
from ..generator.engines import SamplingParams, create_engine
from .service import EvaluatorService


@serve.deployment(name="Evaluator")
class EvaluatorDeployment:
    def __init__(self, settings: dict):
        config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(config.store.root, config.store.allowed_schemes)
        self.service = EvaluatorService(create_engine(config.generation.engine, batch_size=config.generation.batch_size,
                                                      trust_remote_code=config.model.trust_remote_code,
                                                      cache_dir=config.model.builtin_cache_dir))

    @grpc_method(evaluator_pb2.EvaluateModelResponse)
    def EvaluateModel(self, request: evaluator_pb2.EvaluateModelRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store)
        check_range(request.max_instances_per_task, "max_instances_per_task", 0, 10_000)
        check_sampling(request.sampling)
        tasks = resolve_tasks(request.eval_tasks, self.store, "eval_tasks", require_instances=True)
        s = request.sampling
        result = self.service.evaluate(model_uri, tasks, request.max_instances_per_task,
                                       SamplingParams(s.temperature, s.top_p or 1.0, s.max_new_tokens, s.seed))
        return evaluator_pb2.EvaluateModelResponse(
            rouge_l=result.rouge_l, num_tasks=len(result.tasks), num_instances=result.num_instances,
            tasks=[evaluator_pb2.TaskScore(task_id=t.task_id, rouge_l=t.rouge_l, instances=t.instances)
                   for t in result.tasks],
        )


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    return EvaluatorDeployment.options(
        ray_actor_options={"num_cpus": config.serve.replica_num_cpus},
        max_ongoing_requests=config.serve.max_ongoing_requests,
    ).bind(config.model_dump())
