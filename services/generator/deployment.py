"""Ray Serve deployment of the generator (gRPC). Validation and proto conversion only."""

from __future__ import annotations

from ray import serve

from ..api import common_pb2, generator_pb2
from ..common.config import ReinstructConfig, config_from_app_args
from ..common.convert import task_to_proto
from ..common.grpc_handler import grpc_method
from ..common.store import RunStore
from ..common.validation import (MAX_PROMPTS, RequestError, check_context, check_model_uri, check_output_uri,
                                 check_range, check_sampling, resolve_tasks)
from .engines import SamplingParams, create_engine
from .service import GeneratorService, RunContext


def _sampling(message: common_pb2.Sampling) -> SamplingParams:
    return SamplingParams(temperature=message.temperature, top_p=message.top_p or 1.0,
                          max_new_tokens=message.max_new_tokens, seed=message.seed)


@serve.deployment(name="Generator")
class GeneratorDeployment:
    def __init__(self, settings: dict):
        config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(config.store.root, config.store.allowed_schemes)
        engine = create_engine(config.generation.engine, batch_size=config.generation.batch_size,
                               trust_remote_code=config.model.trust_remote_code,
                               cache_dir=config.model.builtin_cache_dir)
        self.service = GeneratorService(engine)

    def _respond(self, tasks, output_uri, response_type, **extra):
        if output_uri:
            count = self.store.write_tasks(output_uri, tasks)
            return response_type(output=common_pb2.DatasetRef(uri=output_uri, count=count), **extra)
        return response_type(tasks=[task_to_proto(t) for t in tasks], **extra)

    @grpc_method(generator_pb2.GenerateInstructionsResponse)
    def GenerateInstructions(self, request: generator_pb2.GenerateInstructionsRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store)
        check_range(request.num_prompts, "num_prompts", 1, MAX_PROMPTS)
        check_range(request.num_human_in_context, "num_human_in_context", 0, 8)
        check_range(request.num_machine_in_context, "num_machine_in_context", 0, 8)
        if request.num_human_in_context + request.num_machine_in_context == 0:
            raise RequestError("num_human_in_context", "at least one in-context task is needed")
        check_sampling(request.sampling)
        check_output_uri(request.output_uri, self.store, "output_uri")
        human = resolve_tasks(request.seed_tasks, self.store, "seed_tasks")
        machine = resolve_tasks(request.machine_tasks, self.store, "machine_tasks", required=False)
        ctx = RunContext(request.context.run_id, request.context.round)
        batch = self.service.generate_instructions(
            ctx, model_uri, human, machine, request.num_prompts, _sampling(request.sampling),
            request.num_human_in_context, request.num_machine_in_context,
        )
        return self._respond(batch.tasks, request.output_uri, generator_pb2.GenerateInstructionsResponse,
                             prompts=batch.prompts, completions_truncated=batch.truncated)

    @grpc_method(generator_pb2.TasksResponse)
    def ClassifyInstructions(self, request: generator_pb2.ClassifyInstructionsRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store)
        check_output_uri(request.output_uri, self.store, "output_uri")
        tasks = resolve_tasks(request.tasks, self.store, "tasks")
        ctx = RunContext(request.context.run_id, request.context.round)
        return self._respond(self.service.classify(ctx, model_uri, tasks), request.output_uri,
                             generator_pb2.TasksResponse)

    @grpc_method(generator_pb2.TasksResponse)
    def GenerateInstances(self, request: generator_pb2.GenerateInstancesRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store)
        check_range(request.num_demonstrations, "num_demonstrations", 0, 8)
        check_sampling(request.sampling)
        check_output_uri(request.output_uri, self.store, "output_uri")
        tasks = resolve_tasks(request.tasks, self.store, "tasks")
        demos = resolve_tasks(request.demonstrations, self.store, "demonstrations", required=False,
                              require_instances=True)
        ctx = RunContext(request.context.run_id, request.context.round)
        out = self.service.generate_instances(ctx, model_uri, tasks, demos, request.num_demonstrations,
                                              _sampling(request.sampling))
        return self._respond(out, request.output_uri, generator_pb2.TasksResponse)


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    return GeneratorDeployment.options(
        ray_actor_options={"num_cpus": config.serve.replica_num_cpus},
        max_ongoing_requests=config.serve.max_ongoing_requests,
    ).bind(config.model_dump())
