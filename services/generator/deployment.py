"""Ray Serve deployment of the generator (gRPC). Validation and proto conversion only."""

# No `from __future__ import annotations` here: FastAPI must see the request models as real types.
import contextlib
from dataclasses import replace

from fastapi import HTTPException
from ray import serve

from ..api import common_pb2, generator_pb2
from ..common import deadline
from ..common.config import (
    ReinstructConfig,
    config_from_app_args,
    engine_options,
    replica_options,
)
from ..common.convert import task_to_proto
from ..common.engines import SamplingParams, create_engine
from ..common.grpc_handler import (
    grpc_method,
    grpc_stream_method,
    refuse_other_services,
    run_with_progress,
)
from ..common.models import BUILTIN_PREFIX
from ..common.store import RunStore
from ..common.validation import (
    MAX_INLINE_TASKS,
    MAX_PROMPTS,
    RequestError,
    TrustedModels,
    check_context,
    check_cost,
    check_model_uri,
    check_output_uri,
    check_range,
    check_sampling,
    check_text,
    resolve_tasks,
)
from .backtranslation import RATERS
from .openai_api import ChatRequest, CompletionRequest, chat_prompt, completion_response, openai_app
from .service import GeneratorService, RunContext


def _sampling(message: common_pb2.Sampling, max_prompt_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p or 1.0,
        max_new_tokens=message.max_new_tokens,
        seed=message.seed,
        presence_penalty=message.presence_penalty,
        max_prompt_tokens=max_prompt_tokens,
    )


def in_context_counts(request: generator_pb2.GenerateInstructionsRequest, defaults: tuple[int, int]) -> tuple[int, int]:
    """Human and machine tasks per prompt: the request's, or for a field it left unset the replica's
    config (generation.num_human_in_context / num_machine_in_context); 0 set explicitly stays 0."""
    human, machine = (
        getattr(request, name) if request.HasField(name) else default
        for name, default in zip(("num_human_in_context", "num_machine_in_context"), defaults)
    )
    check_range(human, "num_human_in_context", 0, 8)
    check_range(machine, "num_machine_in_context", 0, 8)
    if human + machine == 0:
        raise RequestError("num_human_in_context", "at least one in-context task is needed")
    if human + machine > 8:  # the prompt numbers 8 tasks and asks for the 9th to the 16th
        raise RequestError("num_human_in_context", f"{human} + {machine} in-context tasks; at most 8 in all")
    return int(human), int(machine)


@serve.deployment(name="Generator")
@serve.ingress(openai_app)
@refuse_other_services("Generator")
class GeneratorDeployment:
    def __init__(self, settings: dict):
        config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(config.store.root, config.store.allowed_schemes)
        self.request_budget_s = config.serve.request_timeout_s  # work past it is abandoned (deadline.py)
        self.serve_host = config.serve.host  # without a token, gRPC answers loopback clients only
        self.trusted = TrustedModels.from_config(config)
        engine = create_engine(config.generation.engine, **engine_options(config))
        self.service = GeneratorService(engine)
        self.default_model = config.model.base
        self.curation_rater = config.backtranslation.curation  # a request without a rater gets this one
        self.demonstration_limits = {
            "demonstration_instances": config.generation.demonstration_instances,
            "demonstration_labels": config.generation.demonstration_labels,
        }
        self.prompt_format = config.model.prompt_format
        self.max_prompt_tokens = config.generation.max_prompt_tokens  # every prompt's pass is bounded
        self.in_context_defaults = (config.generation.num_human_in_context, config.generation.num_machine_in_context)

    # ---- OpenAI-compatible HTTP (route prefix /generator) ---------------------------------------
    def _openai_model(self, name: str) -> str:
        """'' / 'current': the model loaded now; 'run:<run id>': the model that run stands on now (its
        latest promoted model, so a continuous loop is served without a restart); else a preset or a
        model the config allows. HTTP calls carry no run key, so they read no run's checkpoint by path:
        a run's model is served only once its own driver has promoted it (the manifest, which no
        request can write)."""
        if name in ("", "current"):
            return self.service.engine.model_uri or self.default_model
        if name.startswith("run:"):
            try:
                check_context(common_pb2.RunContext(run_id=name[4:]))
                promoted = self.store.load_manifest(name[4:]).get("promoted_model")
            except (RequestError, ValueError) as exc:  # ValueError: UriNotAllowed
                raise HTTPException(400, f"model: {exc}") from None
            if not promoted:
                raise HTTPException(404, f"model: run {name[4:]!r} has no promoted model yet")
            return promoted
        if not (name.startswith(BUILTIN_PREFIX) or self.trusted.allows(name)):
            raise HTTPException(
                400,
                f"model: {name[:200]!r} is no preset and no model the config allows (model.base, "
                "model.allowed_dirs); a run's model is served as run:<run id>, once its driver promoted it",
            )
        try:
            return check_model_uri(name, self.store, "model", trusted=self.trusted)
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None

    @openai_app.get("/v1/models")
    def list_models(self):
        current = self.service.engine.model_uri or self.default_model
        return {"object": "list", "data": [{"id": current, "object": "model", "owned_by": "reinstruct"}]}

    @contextlib.contextmanager
    def _http_budget(self):
        """An HTTP request gets the gRPC methods' budget (serve.request_timeout_s): past it the engine
        stops and the answer is 504, so an abandoned request never keeps the replica busy."""
        try:
            with deadline.budget(self.request_budget_s):
                yield
        except deadline.WorkAbandoned as exc:
            # past the budget a retry fails the same way: say so to clients that retry 5xx (OpenAI's do)
            raise HTTPException(504, str(exc), headers={"x-should-retry": "false"}) from None
        except RequestError as exc:
            raise HTTPException(400, str(exc)) from None

    @openai_app.post("/v1/completions")
    def completions(self, body: CompletionRequest):
        model = self._openai_model(body.model)
        with self._http_budget(), self.service.engine.using(model):
            prompts = body.texts(self.service.engine.tokenizer)
            check_cost(len(prompts), body.max_tokens, "prompt")
            out = self.service.engine.generate(
                prompts, replace(body.sampling(), max_prompt_tokens=self.max_prompt_tokens)
            )
            return completion_response(model, [(c.text, c.finish_reason) for c in out], "text")

    @openai_app.post("/v1/chat/completions")
    def chat_completions(self, body: ChatRequest):
        model = self._openai_model(body.model)
        with self._http_budget(), self.service.engine.using(model):
            prompt, answer_ends = chat_prompt(self.service.engine.tokenizer, body.messages, self.prompt_format)
            sampling = body.sampling()
            out = self.service.engine.generate(
                [prompt],
                SamplingParams(
                    sampling.temperature,
                    sampling.top_p,
                    sampling.max_new_tokens,
                    sampling.seed,
                    sampling.stop or answer_ends,
                    sampling.presence_penalty,
                    max_prompt_tokens=self.max_prompt_tokens,
                ),
            )
            return completion_response(model, [(c.text.strip(), c.finish_reason) for c in out], "chat")

    def _respond(self, request, tasks, response_type, **extra):
        if request.output_uri:
            count = self.store.write_output(request.output_uri, request.context.run_id, tasks)
            return response_type(output=common_pb2.DatasetRef(uri=request.output_uri, count=count), **extra)
        return response_type(tasks=[task_to_proto(t) for t in tasks], **extra)

    @grpc_method(generator_pb2.GenerateInstructionsResponse)
    def GenerateInstructions(self, request: generator_pb2.GenerateInstructionsRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store, trusted=self.trusted)
        check_range(request.num_prompts, "num_prompts", 1, MAX_PROMPTS)
        check_cost(request.num_prompts, request.sampling.max_new_tokens, "num_prompts")
        num_human, num_machine = in_context_counts(request, self.in_context_defaults)
        check_sampling(request.sampling)
        check_output_uri(request.output_uri, self.store, "output_uri", request.context.run_id)
        human = resolve_tasks(request.seed_tasks, self.store, "seed_tasks")
        machine = resolve_tasks(request.machine_tasks, self.store, "machine_tasks", required=False)
        ctx = RunContext(request.context.run_id, request.context.round)
        batch = self.service.generate_instructions(
            ctx,
            model_uri,
            human,
            machine,
            request.num_prompts,
            _sampling(request.sampling, self.max_prompt_tokens),
            num_human,
            num_machine,
            request.classification_only,
            int(check_range(request.first_prompt_index, "first_prompt_index", 0, 10_000_000)),
        )
        return self._respond(
            request,
            batch.tasks,
            generator_pb2.GenerateInstructionsResponse,
            prompts=batch.prompts,
            completions_truncated=batch.truncated,
        )

    @grpc_method(generator_pb2.TasksResponse)
    def ClassifyInstructions(self, request: generator_pb2.ClassifyInstructionsRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store, trusted=self.trusted)
        check_output_uri(request.output_uri, self.store, "output_uri", request.context.run_id)
        tasks = resolve_tasks(request.tasks, self.store, "tasks")
        ctx = RunContext(request.context.run_id, request.context.round)
        return self._respond(
            request, self.service.classify(ctx, model_uri, tasks, self.max_prompt_tokens), generator_pb2.TasksResponse
        )

    def _instances_request(self, request: generator_pb2.GenerateInstancesRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store, trusted=self.trusted)
        check_range(request.num_demonstrations, "num_demonstrations", 0, 8)
        check_sampling(request.sampling)
        check_output_uri(request.output_uri, self.store, "output_uri", request.context.run_id)
        tasks = resolve_tasks(request.tasks, self.store, "tasks")
        check_cost(len(tasks), request.sampling.max_new_tokens, "tasks")
        demos = resolve_tasks(
            request.demonstrations, self.store, "demonstrations", required=False, require_instances=True
        )
        return RunContext(request.context.run_id, request.context.round), model_uri, tasks, demos

    @grpc_method(generator_pb2.TasksResponse)
    def GenerateInstances(self, request: generator_pb2.GenerateInstancesRequest):
        ctx, model_uri, tasks, demos = self._instances_request(request)
        out = self.service.generate_instances(
            ctx,
            model_uri,
            tasks,
            demos,
            request.num_demonstrations,
            _sampling(request.sampling, self.max_prompt_tokens),
            **self.demonstration_limits,
        )
        return self._respond(request, out, generator_pb2.TasksResponse)

    @grpc_stream_method
    def StreamInstances(self, request: generator_pb2.GenerateInstancesRequest):
        ctx, model_uri, tasks, demos = self._instances_request(request)
        for done, value in run_with_progress(
            lambda on_progress: self.service.generate_instances(
                ctx,
                model_uri,
                tasks,
                demos,
                request.num_demonstrations,
                _sampling(request.sampling, self.max_prompt_tokens),
                on_progress=on_progress,
                **self.demonstration_limits,
            )
        ):
            if done != "result":
                yield generator_pb2.GenerationProgress(done=done, total=value)
            else:
                yield generator_pb2.GenerationProgress(
                    done=len(tasks), total=len(tasks), result=self._respond(request, value, generator_pb2.TasksResponse)
                )

    @grpc_method(generator_pb2.TasksResponse)
    def Backtranslate(self, request: generator_pb2.BacktranslateRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store, trusted=self.trusted)
        check_sampling(request.sampling)
        check_output_uri(request.output_uri, self.store, "output_uri", request.context.run_id)
        if request.segments and request.segment_tasks.WhichOneof("source"):
            raise RequestError("segments", "give segments inline or segment_tasks, not both")
        if request.segments:
            if len(request.segments) > MAX_INLINE_TASKS:
                raise RequestError("segments", f"has {len(request.segments)}; the inline limit is {MAX_INLINE_TASKS}")
            segments = [
                (str(i), check_text(text, f"segments[{i}]", required=True)) for i, text in enumerate(request.segments)
            ]
        else:
            tasks = resolve_tasks(
                request.segment_tasks, self.store, "segment_tasks", require_instances=True, require_instruction=False
            )
            segments = [(t.id, t.instances[0].output) for t in tasks if t.instances and t.instances[0].output.strip()]
            if not segments:
                raise RequestError("segment_tasks", "no task carries a non-empty segment in instances[0].output")
        ctx = RunContext(request.context.run_id, request.context.round)
        out = self.service.backtranslate(ctx, model_uri, segments, _sampling(request.sampling, self.max_prompt_tokens))
        return self._respond(request, out, generator_pb2.TasksResponse)

    @grpc_method(generator_pb2.TasksResponse)
    def CurateExamples(self, request: generator_pb2.CurateExamplesRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store, trusted=self.trusted)
        check_output_uri(request.output_uri, self.store, "output_uri", request.context.run_id)
        rater = request.rater or self.curation_rater
        if rater not in RATERS:
            raise RequestError("rater", f"is {rater!r}; expected one of {', '.join(RATERS)} (or empty: the default)")
        tasks = resolve_tasks(request.tasks, self.store, "tasks", require_instances=True)
        ctx = RunContext(request.context.run_id, request.context.round)
        return self._respond(
            request,
            self.service.curate(ctx, model_uri, tasks, rater, self.prompt_format),
            generator_pb2.TasksResponse,
        )


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    options = replica_options(config, "generator", num_gpus=config.generation.num_gpus)
    return GeneratorDeployment.options(**options).bind(config.model_dump())
