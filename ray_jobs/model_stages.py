"""Stages that train a model, score it and decide on it: Ray Train through the trainer, held-out
evaluation in shards over the evaluator replicas, the promotion gate, the judge and the final test."""

from __future__ import annotations

from services.api import common_pb2, evaluator_pb2, trainer_pb2
from services.common.convert import uri_source
from services.common.stages import Decision, Evaluated, Judged, Split, Tested, Trained
from services.evaluator.combine import combine

from .fanout import Shard
from .run import Run


def train(run: Run, k: int, base_model: str, dataset_uri: str, epochs: int, output_uri: str | None = None) -> Trained:
    t = run.config.training
    request = trainer_pb2.StartTrainingRequest(
        context=run.ctx(k),
        base_model_uri=base_model,
        train_tasks=uri_source(dataset_uri),
        output_model_uri=output_uri or run.store.model_uri(run.run_id, k),
        params=trainer_pb2.TrainingParams(
            epochs=epochs,
            max_steps=t.max_steps,
            learning_rate=t.learning_rate,
            batch_size=t.batch_size,
            max_seq_len=t.max_seq_len,
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            seed=run.config.seed + k,
            augmented_tag=run.config.backtranslation.tag,
        ),
    )
    status = run.clients.wait_for_training(
        request,
        poll_s=t.poll_interval_s,
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
    )


def _greedy(max_new_tokens: int) -> common_pb2.Sampling:
    return common_pb2.Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


def evaluate(run: Run, k: int, model_uri: str, heldout_uri: str) -> Evaluated:
    """The held-out tasks in shards over the evaluator replicas; the shards' scores combine into the
    same means one request would give (the interval is the gate's: promote)."""
    e = run.config.evaluation
    tasks = run.store.read_tasks(heldout_uri)
    total = sum(min(len(t.instances), e.max_instances_per_task or len(t.instances)) for t in tasks)
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
            ),
            on_progress=on_progress,
        )

    sharded = run.shard_stage(k, "evaluate", "evaluator")
    shards = sharded.shards(tasks, run.config.fanout.tasks_per_shard, write_inputs=True)
    parts = sharded.run(shards, send, evaluator_pb2.EvaluateModelResponse)
    predictions_uri = run.uri(k, "eval_predictions")
    sharded.join([p.predictions.uri for p in parts], predictions_uri)
    response = combine(parts)
    per_task = {t.task_id: (t.score if e.promotion_metric == "score" else t.rouge_l) for t in response.tasks}
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
        per_task=per_task,
        predictions_uri=predictions_uri,
        shards=len(shards),
    )


def promote(run: Run, k: int, candidate: Evaluated, incumbent: Decision | None) -> Decision:
    """The evaluator's gate decides whether model k replaces the incumbent; with none, it is promoted.
    Only per-task scores travel: the statistics are the evaluator's."""
    e = run.config.evaluation
    decision = run.clients.decide_promotion(
        evaluator_pb2.DecidePromotionRequest(
            context=run.ctx(k),
            candidate_scores=candidate.per_task,
            incumbent_scores=incumbent.per_task if incumbent else {},
            metric=e.promotion_metric,
            margin=e.promote_margin,
            confidence=e.confidence,
            bootstrap_resamples=e.bootstrap_resamples,
            seed=run.config.seed + k,
        )
    )
    has_incumbent = decision.HasField("incumbent")
    keep_candidate = decision.promoted or incumbent is None
    return Decision(
        promoted=decision.promoted,
        metric=decision.metric,
        candidate=decision.candidate.estimate,
        candidate_interval=[decision.candidate.low, decision.candidate.high],
        incumbent=decision.incumbent if has_incumbent else None,
        difference=decision.difference.estimate if has_incumbent else decision.candidate.estimate,
        low=decision.difference.low if has_incumbent else decision.candidate.low,
        high=decision.difference.high if has_incumbent else decision.candidate.high,
        confidence=e.confidence,  # what was asked (the reply carries it as a float32)
        margin=decision.margin,
        reason=decision.reason,
        model_uri=candidate.model_uri if keep_candidate else incumbent.model_uri,
        per_task=candidate.per_task if keep_candidate else incumbent.per_task,
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


def test(run: Run, k: int, split: Split, first_model: str, final_model: str) -> Tested:
    """Model 0 and the final model on the test tasks, which chose nothing: the honest score."""
    e = run.config.evaluation
    response = run.clients.compare_models(
        evaluator_pb2.CompareModelsRequest(
            context=run.ctx(k),
            model_a_uri=first_model,
            model_b_uri=final_model,
            eval_tasks=uri_source(split.seed_test_uri),
            max_instances_per_task=e.max_instances_per_task,
            sampling=_greedy(e.max_new_tokens),
            bootstrap_resamples=e.bootstrap_resamples,
            confidence=e.confidence,
        )
    )
    d = response.score_difference
    return Tested(
        model_0=first_model,
        final_model=final_model,
        model_0_score=response.a.score,
        final_score=response.b.score,
        difference=[d.estimate, d.low, d.high],
        confidence=e.confidence,
        num_tasks=response.b.num_tasks,
    )
