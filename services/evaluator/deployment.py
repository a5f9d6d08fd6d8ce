"""Ray Serve deployment of the evaluator (gRPC). Validation and proto conversion only."""

from __future__ import annotations

from ray import serve

from ..api import common_pb2, evaluator_pb2
from ..common.config import ReinstructConfig, config_from_app_args, engine_options, replica_options
from ..common.engines import SamplingParams, create_engine
from ..common.grpc_handler import grpc_method, grpc_stream_method, refuse_other_services, run_with_progress
from ..common.store import RunStore
from ..common.validation import (
    MAX_BOOTSTRAP_CELLS,
    MAX_ID_CHARS,
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
from . import standard_benchmarks
from .gate import METRICS, TaskMetrics, decide
from .intervals import METHODS
from .service import Evaluation, EvaluatorService


def _sampling(s: common_pb2.Sampling) -> SamplingParams:
    return SamplingParams(s.temperature, s.top_p or 1.0, s.max_new_tokens, s.seed)


def _response(evaluation: Evaluation) -> evaluator_pb2.EvaluateModelResponse:
    return evaluator_pb2.EvaluateModelResponse(
        rouge_l=evaluation.rouge_l,
        score=evaluation.score,
        exact_match=evaluation.exact_match,
        nll=evaluation.nll,
        num_tasks=len(evaluation.tasks),
        num_instances=evaluation.num_instances,
        tasks=[
            evaluator_pb2.TaskScore(
                task_id=t.task_id,
                rouge_l=t.mean("rouge_l"),
                instances=len(t.rouge_l),
                exact_match=t.mean("exact_match"),
                score=t.score,
                nll=t.mean("nll"),
                category=t.category,
                answer_words=t.mean("answer_words"),
                answer_tokens=t.mean("answer_tokens"),
                truncated=t.mean("truncated"),
            )
            for t in evaluation.tasks
        ],
        answer_words=evaluation.answer_words,
        answer_tokens=evaluation.answer_tokens,
        truncated=evaluation.truncated,
        stops=list(evaluation.stops),
        categories=[
            evaluator_pb2.CategoryScore(category=name, score=score, tasks=n)
            for name, (score, n) in evaluation.categories().items()
        ],
    )


def _interval(interval) -> evaluator_pb2.Interval:
    return evaluator_pb2.Interval(
        estimate=interval.estimate,
        low=interval.low,
        high=interval.high,
        confidence=interval.confidence,
        method=interval.method,
        n=interval.n,
        standard_error=interval.standard_error,
        minimum_detectable=interval.minimum_detectable,
    )


@serve.deployment(name="Evaluator")
@refuse_other_services("Evaluator")
class EvaluatorDeployment:
    def __init__(self, settings: dict):
        config = ReinstructConfig.model_validate(settings)
        self.store = RunStore(config.store.root, config.store.allowed_schemes)
        self.request_budget_s = config.serve.request_timeout_s  # work past it is abandoned (deadline.py)
        self.serve_host = config.serve.host  # without a token, gRPC answers loopback clients only
        self.trusted = TrustedModels.from_config(config)
        self.evaluation = config.evaluation
        self.model = config.model
        self.seed_tag = config.backtranslation.seed_tag
        self.batch_size = config.generation.batch_size
        self.service = EvaluatorService(
            create_engine(config.generation.engine, **engine_options(config)),
            config.model.prompt_format,
            config.training.max_seq_len,
            seed_tag=config.backtranslation.seed_tag,
        )

    def _checked(self, request: evaluator_pb2.EvaluateModelRequest):
        check_context(request.context)
        model_uri = check_model_uri(request.model_uri, self.store, trusted=self.trusted)
        check_range(request.max_instances_per_task, "max_instances_per_task", 0, 10_000)
        check_sampling(request.sampling)
        check_output_uri(request.predictions_uri, self.store, "predictions_uri", request.context.run_id)
        self._stops(request.stop)
        tasks = resolve_tasks(request.eval_tasks, self.store, "eval_tasks", require_instances=True)
        per_task = request.max_instances_per_task or max(len(t.instances) for t in tasks)
        check_cost(len(tasks) * per_task, request.sampling.max_new_tokens, "eval_tasks")
        if request.HasField("nll_instances_per_task"):
            check_range(request.nll_instances_per_task, "nll_instances_per_task", 0, 10_000)
        return model_uri, tasks

    def _nll_instances(self, request) -> int:
        if request.HasField("nll_instances_per_task"):
            return request.nll_instances_per_task
        return self.evaluation.nll_instances_per_task

    def _stops(self, stop) -> tuple[str, ...]:
        """The request's stop strings (none: evaluation.stop), bounded: a stop string is checked
        against the answer at every step."""
        stops = tuple(stop) or tuple(self.evaluation.stop)
        if len(stops) > MAX_STOPS:
            raise RequestError("stop", f"{len(stops)} stop strings; the limit is {MAX_STOPS}")
        for i, text in enumerate(stops):
            check_text(text, f"stop[{i}]", required=True, limit=MAX_STOP_CHARS)
        return stops

    def _finish(self, request, evaluation: Evaluation) -> evaluator_pb2.EvaluateModelResponse:
        response = _response(evaluation)
        if request.predictions_uri:
            count = self.store.write_output(
                request.predictions_uri, request.context.run_id, evaluation.predictions, "predictions_uri"
            )
            response.predictions.CopyFrom(common_pb2.DatasetRef(uri=request.predictions_uri, count=count))
        return response

    @grpc_method(evaluator_pb2.EvaluateModelResponse)
    def EvaluateModel(self, request: evaluator_pb2.EvaluateModelRequest):
        model_uri, tasks = self._checked(request)
        evaluation = self.service.evaluate(
            model_uri,
            tasks,
            request.max_instances_per_task,
            _sampling(request.sampling),
            with_nll=request.with_nll,
            run_id=request.context.run_id,
            round_index=request.context.round,
            stop=self._stops(request.stop),
            nll_instances_per_task=self._nll_instances(request),
        )
        return self._finish(request, evaluation)

    @grpc_stream_method
    def StreamEvaluation(self, request: evaluator_pb2.EvaluateModelRequest):
        model_uri, tasks = self._checked(request)
        last_total = 0  # the last message counts answers and reference NLLs alike, as every one before it
        for done, value in run_with_progress(
            lambda on_progress: self.service.evaluate(
                model_uri,
                tasks,
                request.max_instances_per_task,
                _sampling(request.sampling),
                with_nll=request.with_nll,
                on_progress=on_progress,
                run_id=request.context.run_id,
                round_index=request.context.round,
                stop=self._stops(request.stop),
                nll_instances_per_task=self._nll_instances(request),
            )
        ):
            if done != "result":
                last_total = value
                yield evaluator_pb2.EvaluationProgress(done=done, total=value)
            else:
                total = last_total or value.num_instances
                yield evaluator_pb2.EvaluationProgress(done=total, total=total, result=self._finish(request, value))

    @grpc_method(evaluator_pb2.CompareModelsResponse)
    def CompareModels(self, request: evaluator_pb2.CompareModelsRequest):
        check_context(request.context)
        model_a = check_model_uri(request.model_a_uri, self.store, "model_a_uri", trusted=self.trusted)
        model_b = check_model_uri(request.model_b_uri, self.store, "model_b_uri", trusted=self.trusted)
        judge = (
            check_model_uri(request.judge_model_uri, self.store, "judge_model_uri", trusted=self.trusted)
            if request.judge_model_uri
            else ""
        )
        check_range(request.max_instances_per_task, "max_instances_per_task", 0, 10_000)
        check_sampling(request.sampling)
        tasks = resolve_tasks(request.eval_tasks, self.store, "eval_tasks", require_instances=True)
        resamples, confidence = self._bootstrap(request, len(tasks))
        method = self._method(request.interval)
        check_cost(2 * len(tasks), request.sampling.max_new_tokens, "eval_tasks")
        result = self.service.compare(
            model_a,
            model_b,
            tasks,
            request.max_instances_per_task,
            _sampling(request.sampling),
            judge,
            resamples,
            confidence,
            method,
            self.evaluation.stratify,
            with_nll=self.evaluation.with_nll,
            stop=tuple(self.evaluation.stop),
            nll_instances_per_task=self.evaluation.nll_instances_per_task,
        )
        response = evaluator_pb2.CompareModelsResponse(
            score_difference=_interval(result.score_difference),
            rouge_l_difference=_interval(result.rouge_l_difference),
            length_controlled_score_difference=_interval(result.length_controlled_score_difference),
            nll_gain=_interval(result.nll_gain),
            a=_response(result.a),
            b=_response(result.b),
        )
        if result.judged is not None:
            response.win_rate, response.tie_rate, response.loss_rate = (
                result.judged.win,
                result.judged.tie,
                result.judged.loss,
            )
            response.judged_pairs = result.judged.pairs
        return response

    def _bootstrap(self, request, tasks: int) -> tuple[int, float]:
        """The request's bootstrap_resamples and confidence (0: the config's), bounded in cost."""
        resamples = request.bootstrap_resamples or self.evaluation.bootstrap_resamples
        check_range(resamples, "bootstrap_resamples", 100, 100_000)
        confidence = request.confidence or self.evaluation.confidence
        check_range(confidence, "confidence", 0.5, 0.999)
        if tasks * resamples > MAX_BOOTSTRAP_CELLS:
            raise RequestError(
                "bootstrap_resamples",
                f"{resamples} resamples of {tasks} tasks is over the "
                f"{MAX_BOOTSTRAP_CELLS:,} cells one comparison may hold; ask for fewer",
            )
        return resamples, confidence

    def _method(self, method: str) -> str:
        method = method or self.evaluation.interval
        if method not in METHODS:
            raise RequestError("interval", f"{method!r}: expected one of {', '.join(METHODS)}")
        return method

    @grpc_method(evaluator_pb2.PromotionDecision)
    def DecidePromotion(self, request: evaluator_pb2.DecidePromotionRequest):
        check_context(request.context)
        candidate = _task_metrics(request.candidate, "candidate")
        if not candidate:
            raise RequestError("candidate", "empty: score the candidate on at least one task")
        against: dict[str, dict[str, TaskMetrics]] = {}
        for i, other in enumerate(request.against):
            name = check_text(other.name, f"against[{i}].name", required=True, limit=MAX_ID_CHARS)
            if name in against:
                raise RequestError(f"against[{i}].name", f"{name!r} is named twice")
            tasks = _task_metrics(other.tasks, f"against[{i}].tasks")
            if not set(tasks) & set(candidate):
                raise RequestError(f"against[{i}].tasks", "no task in common with candidate: nothing to pair")
            against[name] = tasks
        metric = check_text(request.metric, "metric", limit=MAX_ID_CHARS) or self.evaluation.promotion_metric
        if metric not in METRICS:
            raise RequestError("metric", f"{metric!r}: expected one of {', '.join(METRICS)}")
        margin = request.margin if request.HasField("margin") else self.evaluation.promote_margin
        check_range(margin, "margin", -100.0, 100.0)
        score_margin = request.score_margin if request.HasField("score_margin") else self.evaluation.score_margin
        check_range(score_margin, "score_margin", 0.0, 1.0)
        if request.seed < 0:
            raise RequestError("seed", f"{request.seed} is negative")
        cells = len(candidate) * (1 + len(against))
        resamples, confidence = self._bootstrap(request, cells)
        decision = decide(
            candidate,
            against,
            metric=metric,
            margin=margin,
            score_margin=score_margin,
            method=self._method(request.interval),
            confidence=confidence,
            resamples=resamples,
            seed=request.seed,
            stratify=request.stratify if request.HasField("stratify") else self.evaluation.stratify,
        )
        return evaluator_pb2.PromotionDecision(
            promoted=decision.promoted,
            metric=decision.metric,
            candidate=_interval(decision.candidate),
            candidate_score=_interval(decision.candidate_score),
            comparisons=[
                evaluator_pb2.Comparison(
                    against=c.against,
                    against_mean=c.against_mean,
                    gain=_interval(c.gain),
                    score_difference=_interval(c.score_difference),
                    passed=c.passed,
                    reason=c.reason,
                    length_controlled_score_difference=_interval(c.length_controlled_score_difference),
                )
                for c in decision.comparisons
            ],
            margin=decision.margin,
            score_margin=decision.score_margin,
            reason=decision.reason,
        )

    @grpc_method(evaluator_pb2.RunBenchmarksResponse)
    def RunBenchmarks(self, request: evaluator_pb2.RunBenchmarksRequest):
        check_context(request.context)
        if not request.tasks:
            raise RequestError("tasks", "must not be empty: name at least one lm-eval task")
        if len(request.tasks) > MAX_BENCHMARK_TASKS:
            raise RequestError("tasks", f"{len(request.tasks)} tasks; the limit is {MAX_BENCHMARK_TASKS}")
        specs = [check_text(t, f"tasks[{i}]", required=True, limit=1024) for i, t in enumerate(request.tasks)]
        limit = request.limit if request.HasField("limit") else self.evaluation.benchmark_limit
        check_range(limit, "limit", 0, MAX_BENCHMARK_LIMIT)
        model_uri = request.model_uri
        if model_uri or not request.validate_only:
            model_uri = check_model_uri(model_uri, self.store, trusted=self.trusted)
        # task files run their own code: only those the operator listed
        tasks = standard_benchmarks.resolve_tasks(specs, allowed_files=self.evaluation.benchmarks, field="tasks")
        if request.validate_only:
            standard_benchmarks.check_tasks(tasks, allow_downloads=self.evaluation.benchmark_downloads)
            return evaluator_pb2.RunBenchmarksResponse(
                tasks=[evaluator_pb2.BenchmarkTask(task=t.name, source=t.source) for t in tasks],
                lm_eval_version=standard_benchmarks.lm_eval_version(),
                limit=limit,
            )
        results = standard_benchmarks.run_benchmarks(
            model_uri,
            tasks,
            limit=limit,
            allow_downloads=self.evaluation.benchmark_downloads,
            prompt_format=self.model.prompt_format,
            system_prompt=self.seed_tag,
            batch_size=self.batch_size,
            bootstrap_iters=self.evaluation.bootstrap_resamples,
            trust_remote_code=self.model.trust_remote_code,
            cache_dir=self.model.builtin_cache_dir,
            engine=self.service.engine,
        )
        return _benchmarks_response(results)


def _benchmarks_response(results: standard_benchmarks.BenchmarkResults) -> evaluator_pb2.RunBenchmarksResponse:
    return evaluator_pb2.RunBenchmarksResponse(
        tasks=[
            evaluator_pb2.BenchmarkTask(
                task=t.task,
                metrics=[
                    evaluator_pb2.BenchmarkMetric(
                        name=m.name, value=m.value, stderr=m.stderr, higher_is_better=m.higher_is_better
                    )
                    for m in t.metrics
                ],
                samples=t.samples,
                version=t.version,
                source=t.source,
            )
            for t in results.tasks
        ],
        lm_eval_version=results.lm_eval_version,
        prompt_style=results.prompt_style,
        adapter=results.adapter,
        limit=results.limit,
        elapsed_s=results.elapsed_s,
    )


MAX_BENCHMARK_TASKS = 64
MAX_BENCHMARK_LIMIT = 100_000  # examples per task: lm-eval's largest tasks hold tens of thousands
MAX_STOPS = 16
MAX_STOP_CHARS = 64
MAX_NLL = 1000.0  # nats per token: far above any real model's; bounds what a client can send


def _task_metrics(tasks, field: str) -> dict[str, TaskMetrics]:
    """Per-task metrics: task ids as elsewhere, score and ROUGE-L in [0, 1], NLL in [0, MAX_NLL]."""
    out = {}
    for task_id, m in tasks.items():
        check_text(task_id, f"{field} key", required=True, limit=MAX_ID_CHARS)
        check_range(m.score, f"{field}[{task_id!r}].score", 0.0, 1.0)
        check_range(m.rouge_l, f"{field}[{task_id!r}].rouge_l", 0.0, 1.0)
        check_range(m.nll, f"{field}[{task_id!r}].nll", 0.0, MAX_NLL)
        check_text(m.category, f"{field}[{task_id!r}].category", limit=MAX_ID_CHARS)
        check_range(m.answer_words, f"{field}[{task_id!r}].answer_words", 0.0, 1e6)
        out[task_id] = TaskMetrics(m.score, m.nll, m.rouge_l, m.category, m.answer_words)
    return out


def build_app(args: dict | None = None):
    config = config_from_app_args(args)
    options = replica_options(config, "evaluator", num_gpus=config.generation.num_gpus)
    return EvaluatorDeployment.options(**options).bind(config.model_dump())
