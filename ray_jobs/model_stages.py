"""Stages that train a model, score it and decide on it: Ray Train through the trainer, held-out
evaluation in shards over the evaluator replicas, the promotion gate, the judge and the final test."""

from __future__ import annotations

from ray_jobs.combine import combine
from ray_jobs.manifest import Benchmarked, Decision, Evaluated, Gate, Judged, Split, Tested, Trained
from services.api import common_pb2, evaluator_pb2, trainer_pb2
from services.common.convert import uri_source
from services.common.sections import to_message

from .fanout import Shard
from .run import Run
from .tracking import loss_log


def train(run: Run, k: int, base_model: str, dataset_uri: str, epochs: int, output_uri: str | None = None) -> Trained:
    t = run.config.training
    output_uri = output_uri or run.store.model_uri(run.run_id, k)
    request = trainer_pb2.StartTrainingRequest(
        context=run.ctx(k),
        base_model_uri=base_model,
        train_tasks=uri_source(dataset_uri),
        output_model_uri=output_uri,
        training=to_message(t.model_copy(update={"epochs": epochs})),  # the section whole, this stage's epochs
        seed=run.config.seed + k,
        augmented_tag=run.config.backtranslation.tag,
        loss_log=loss_log(run.store, run.config, run.run_id, k, output_uri),
    )
    status = run.clients.wait_for_training(
        request,
        poll_s=t.poll_interval_s,
        stall_timeout_s=t.stall_timeout_s,
        on_progress=lambda s: run.reporter.training(k, s.step, s.total_steps, s.loss),
    )
    return Trained(
        model_uri=status.model_uri,
        base_model=base_model,
        job_id=status.job_id,
        steps=status.step,
        final_loss=status.loss,
        losses=list(status.losses),
        examples=status.train_examples,
        resumed_from_step=status.resumed_from_step,
        model_digest=status.model_digest,
    )


def _greedy(max_new_tokens: int) -> common_pb2.Sampling:
    return common_pb2.Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


def evaluate(run: Run, k: int, model_uri: str, heldout_uri: str, stage: str = "evaluate") -> Evaluated:
    """The held-out tasks in shards over the evaluator replicas; the shards' scores combine into the
    same means one request would give (the interval is the gate's: promote)."""
    e = run.config.evaluation
    tasks = run.store.read_tasks(heldout_uri)
    answers = sum(min(len(t.instances), e.max_instances_per_task or len(t.instances)) for t in tasks)
    references = sum(min(len(t.instances), e.nll_instances_per_task or len(t.instances)) for t in tasks)
    total = answers + (references if e.with_nll else 0)
    progress: dict[int, int] = {}

    def send(shard: Shard) -> evaluator_pb2.EvaluateModelResponse:
        def on_progress(done: int, _total: int) -> None:
            progress[shard.index] = done
            run.reporter.evaluation(k, sum(progress.values()), total)

        return run.clients.stream_evaluation(
            evaluator_pb2.EvaluateModelRequest(
                context=run.ctx(k),
                model_uri=model_uri,
                eval_tasks=uri_source(shard.input_uri),
                max_instances_per_task=e.max_instances_per_task,
                with_nll=e.with_nll,
                sampling=_greedy(e.max_new_tokens),
                predictions_uri=shard.output_uri,
                stop=e.stop,
                nll_instances_per_task=e.nll_instances_per_task,
            ),
            on_progress=on_progress,
        )

    sharded = run.shard_stage(k, stage, "evaluator")
    shards = sharded.shards(tasks, run.config.fanout.tasks_per_shard, write_inputs=True)
    parts = sharded.run(shards, send, evaluator_pb2.EvaluateModelResponse)
    predictions_uri = run.uri(k, "eval_predictions" if stage == "evaluate" else f"{stage}_predictions")
    sharded.join([p.predictions.uri for p in parts], predictions_uri)
    response = combine(parts)
    return Evaluated(
        model_uri=model_uri,
        metric=e.promotion_metric,
        score=response.score,
        rouge_l=response.rouge_l,
        exact_match=response.exact_match,
        nll=response.nll,
        num_tasks=response.num_tasks,
        num_instances=response.num_instances,
        categories={c.category: c.score for c in response.categories},
        task_metrics={
            t.task_id: {
                "score": t.score,
                "nll": t.nll,
                "rouge_l": t.rouge_l,
                "category": t.category,
                "answer_words": t.answer_words,
            }
            for t in response.tasks
        },
        predictions_uri=predictions_uri,
        shards=len(shards),
        answer_words=response.answer_words,
        answer_tokens=response.answer_tokens,
        truncated=response.truncated,
        stops=list(response.stops),
    )


def _task_metrics(metrics: dict[str, dict]) -> dict[str, evaluator_pb2.TaskMetrics]:
    return {
        t: evaluator_pb2.TaskMetrics(
            score=m["score"], nll=m["nll"], rouge_l=m["rouge_l"], category=m["category"], answer_words=m["answer_words"]
        )
        for t, m in metrics.items()
    }


def _bounds(interval: evaluator_pb2.Interval) -> list[float]:
    return [interval.estimate, interval.low, interval.high]


def _decide(run: Run, k: int, candidate: dict[str, dict], against: dict[str, dict[str, dict]], metric: str = ""):
    """The evaluator's gate on per-task metrics: every statistic is computed there."""
    e = run.config.evaluation
    return run.clients.decide_promotion(
        evaluator_pb2.DecidePromotionRequest(
            context=run.ctx(k),
            candidate=_task_metrics(candidate),
            against=[
                evaluator_pb2.ModelScores(name=name, tasks=_task_metrics(metrics)) for name, metrics in against.items()
            ],
            metric=metric or e.promotion_metric,
            margin=e.promote_margin,
            score_margin=e.score_margin,
            confidence=e.confidence,
            bootstrap_resamples=e.bootstrap_resamples,
            interval=e.interval,
            stratify=e.stratify,
            seed=run.config.seed + k,
        )
    )


def promote(
    run: Run, k: int, candidate: Evaluated, incumbent: Decision | None, control: Evaluated | None = None
) -> Decision:
    """The evaluator's gate decides whether model k replaces the incumbent: it must beat each model
    evaluation.gate_against names (the incumbent; the seeds-only control when there is one). With no
    incumbent (model 0), it is promoted."""
    e = run.config.evaluation
    against: dict[str, tuple[str, dict]] = {}
    if incumbent is not None:
        if "incumbent" in e.gate_against:
            against["incumbent"] = (incumbent.model_uri, incumbent.task_metrics)
        if "control" in e.gate_against and control is not None and control.model_uri != incumbent.model_uri:
            against["control"] = (control.model_uri, control.task_metrics)
    decision = _decide(run, k, candidate.task_metrics, {name: m for name, (_, m) in against.items()})
    gates = [
        Gate(
            against=c.against,
            against_model_uri=against[c.against][0],
            against_mean=c.against_mean,
            gain=_bounds(c.gain),
            gain_mde=c.gain.minimum_detectable,
            score_difference=_bounds(c.score_difference),
            score_mde=c.score_difference.minimum_detectable,
            length_controlled_score_difference=_bounds(c.length_controlled_score_difference),
            passed=c.passed,
            reason=c.reason,
        )
        for c in decision.comparisons
    ]
    first = next((g for g in gates if g.against == "incumbent"), gates[0] if gates else None)
    keep_candidate = decision.promoted or incumbent is None
    return Decision(
        promoted=decision.promoted,
        metric=decision.metric,
        candidate=decision.candidate.estimate,
        candidate_interval=[decision.candidate.low, decision.candidate.high],
        candidate_score=decision.candidate_score.estimate,
        candidate_score_interval=[decision.candidate_score.low, decision.candidate_score.high],
        incumbent=first.against_mean if first else None,
        difference=first.gain[0] if first else decision.candidate.estimate,
        low=first.gain[1] if first else decision.candidate.low,
        high=first.gain[2] if first else decision.candidate.high,
        confidence=e.confidence,  # what was asked (the reply carries it as a float32)
        interval=decision.candidate.method,
        margin=decision.margin,
        score_margin=decision.score_margin,
        reason=decision.reason,
        comparisons=[g.to_dict() for g in gates],
        model_uri=candidate.model_uri if keep_candidate else incumbent.model_uri,
        task_metrics=candidate.task_metrics if keep_candidate else incumbent.task_metrics,
        candidate_model_uri=candidate.model_uri,
    )


def judge(run: Run, k: int, incumbent: Decision, candidate: Evaluated, heldout_uri: str) -> Judged:
    e = run.config.evaluation
    response = run.clients.compare_models(
        evaluator_pb2.CompareModelsRequest(
            context=run.ctx(k),
            model_a_uri=incumbent.model_uri,
            model_b_uri=candidate.model_uri,
            eval_tasks=uri_source(heldout_uri),
            max_instances_per_task=e.max_instances_per_task,
            sampling=_greedy(e.max_new_tokens),
            judge_model_uri=e.judge_model,
            bootstrap_resamples=e.bootstrap_resamples,
            confidence=e.confidence,
        )
    )
    d = response.score_difference
    return Judged(
        win_rate=response.win_rate,
        tie_rate=response.tie_rate,
        loss_rate=response.loss_rate,
        judged_pairs=response.judged_pairs,
        score_difference=[d.estimate, d.low, d.high],
    )


def test(run: Run, k: int, split: Split, first_model: str, final_model: str, control_model: str | None) -> Tested:
    """Model 0, the seeds-only control and the final model on the test tasks, which chose nothing:
    the honest numbers. Each distinct model is evaluated once; the intervals are the evaluator's."""
    e = run.config.evaluation
    models = {"model_0": first_model, "final": final_model}
    if control_model:
        models["control"] = control_model
    evaluated: dict[str, Evaluated] = {}
    for name, uri in models.items():
        same = next((ev for ev in evaluated.values() if ev.model_uri == uri), None)
        evaluated[name] = same or evaluate(run, k, uri, split.seed_test_uri, stage=f"test_{name}")
    final = evaluated["final"]
    against = {"model_0": evaluated["model_0"].task_metrics}
    if "control" in evaluated:
        against["control"] = evaluated["control"].task_metrics
    # the decision is not used: the gate's comparisons give the intervals (NLL gain and score)
    decision = _decide(run, k, final.task_metrics, against, metric="nll" if e.with_nll else "score")
    by_name = {c.against: c for c in decision.comparisons}
    versus_0, versus_control = by_name["model_0"], by_name.get("control")
    control = evaluated.get("control")
    benchmarks, lm_eval_version, prompt_style, adapter = (
        _benchmarks(run, k, models) if e.benchmarks else ([], "", "", "")
    )
    return Tested(
        model_0=first_model,
        final_model=final_model,
        control_model=control_model or "",
        model_0_score=evaluated["model_0"].score,
        final_score=final.score,
        control_score=control.score if control else None,
        model_0_nll=evaluated["model_0"].nll,
        final_nll=final.nll,
        control_nll=control.nll if control else None,
        answer_words={name: ev.answer_words for name, ev in evaluated.items()},
        difference=_bounds(versus_0.score_difference),
        nll_gain=_bounds(versus_0.gain) if decision.metric == "nll" else [],
        length_controlled_difference=_bounds(versus_0.length_controlled_score_difference),
        over_control=_bounds(versus_control.score_difference) if versus_control else [],
        nll_gain_over_control=_bounds(versus_control.gain) if versus_control and decision.metric == "nll" else [],
        confidence=e.confidence,
        interval=decision.candidate.method,
        num_tasks=final.num_tasks,
        benchmarks=[b.to_dict() for b in benchmarks],
        lm_eval_version=lm_eval_version,
        benchmark_limit=e.benchmark_limit,
        benchmark_prompt_style=prompt_style,
        benchmark_adapter=adapter,
    )


def check_benchmarks(run: Run) -> None:
    """Before any stage: evaluation.benchmarks names tasks the evaluator finds, with data it can load
    (a wrong name or data offline fails here, in one line, not after the rounds)."""
    e = run.config.evaluation
    run.clients.run_benchmarks(
        evaluator_pb2.RunBenchmarksRequest(
            context=run.ctx(0), tasks=e.benchmarks, limit=e.benchmark_limit, validate_only=True
        )
    )


def _benchmarks(run: Run, k: int, models: dict[str, str]) -> tuple[list[Benchmarked], str, str, str]:
    """evaluation.benchmarks (lm-eval) on each model of the test stage, each distinct model once;
    with lm-eval's version, the prompt style (chat or plain) the evaluator rendered them in and the
    adapter it ran them through (hf or vllm)."""
    e = run.config.evaluation
    responses: dict[str, evaluator_pb2.RunBenchmarksResponse] = {}
    results = []
    for name, uri in models.items():
        if uri not in responses:
            responses[uri] = run.clients.run_benchmarks(
                evaluator_pb2.RunBenchmarksRequest(
                    context=run.ctx(k), model_uri=uri, tasks=e.benchmarks, limit=e.benchmark_limit
                )
            )
        response = responses[uri]
        results += [
            Benchmarked(
                model=name,
                model_uri=uri,
                task=task.task,
                metrics={m.name: m.value for m in task.metrics},
                stderrs={m.name: m.stderr for m in task.metrics if m.HasField("stderr")},
                higher_is_better={m.name: m.higher_is_better for m in task.metrics if m.HasField("higher_is_better")},
                samples=task.samples,
                version=task.version,
                source=task.source,
                elapsed_s=response.elapsed_s,
            )
            for task in response.tasks
        ]
    first = next(iter(responses.values()))
    return results, first.lm_eval_version, first.prompt_style, first.adapter  # every response of a run has the same
