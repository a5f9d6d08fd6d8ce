"""The self-improvement loop driver. Round k generates with model k, filters, trains model k+1,
evaluates it, and promotes it only if it is better. It talks to the services over gRPC only and
records every stage in the run store; a committed stage is never redone, so a rerun resumes.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.self_improve --config configs/local.yaml --run-id my-run
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.api import common_pb2, evaluator_pb2, filter_pb2, generator_pb2, trainer_pb2
from services.client import ServiceClients
from services.common.config import ReinstructConfig, load_config, parse_config
from services.common.convert import task_from_proto, tasks_to_source, uri_source
from services.common.formats import load_seed_tasks, load_tasks
from services.common.records import Instance, Lineage, TaskRecord, stable_id
from services.common.store import RunStore
from services.evaluator.bootstrap import mean_interval
from services.evaluator.combine import combine
from services.evaluator.gate import decide
from services.evaluator.report import write_report
from services.evaluator.split import split_by_task
from services.generator.backtranslation import backward_tasks, curation_meta_tasks
from services.generator.bootstrap import build_meta_tasks
from services.generator.corpus import load_segments, sample_segments

from .fanout import ShardedStage

log = logging.getLogger("reinstruct.loop")

SELF_INSTRUCT_STAGES = ("generate_instructions", "classify", "generate_instances", "filter")
BACKTRANSLATION_STAGES = ("segments", "backtranslate", "rating_pool", "curate", "filter_augmented")
TRAIN_STAGES = ("train_data", "train", "evaluate", "promote")  # plus "judge" when evaluation.judge is on
BOOTSTRAP_STAGES = ("split", "train_data", "train", "evaluate", "promote")
BASE_MODEL_STAGES = ("split", "evaluate", "promote")  # no bootstrap: the base model is model 0
BACKWARD_STAGES = ("backward_data", "backward_train")


def stage_count(config: ReinstructConfig) -> int | None:
    """How many stages a run has (progress bars); None for a continuous run (loop.rounds 0)."""
    if config.loop.rounds == 0:
        return None
    bt = config.backtranslation.enabled
    per_round = len(SELF_INSTRUCT_STAGES) + len(TRAIN_STAGES) + (len(BACKTRANSLATION_STAGES) if bt else 0)
    per_round += 1 if config.evaluation.judge else 0
    final = 1 if config.evaluation.test_fraction else 0  # the test stage
    first = (len(BOOTSTRAP_STAGES) if config.loop.bootstrap else len(BASE_MODEL_STAGES)) + (
        len(BACKWARD_STAGES) if bt else 0
    )
    return first + config.loop.rounds * per_round + final


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


@dataclass
class LoopDriver:
    config: ReinstructConfig
    clients: ServiceClients
    run_id: str
    reporter: Reporter = field(default_factory=Reporter)

    def __post_init__(self) -> None:
        self.store = RunStore(self.config.store.root, self.config.store.allowed_schemes)

    # ---- plumbing ------------------------------------------------------------------------------
    def _ctx(self, k: int) -> common_pb2.RunContext:
        return common_pb2.RunContext(run_id=self.run_id, round=k)

    def _stage(self, k: int, stage: str, work: Callable[[], dict]) -> dict:
        done = self.store.stage_output(self.run_id, k, stage)
        self.reporter.stage(k, stage, resumed=done is not None)
        if done is not None:
            return done
        started = time.monotonic()
        output = work()
        output["elapsed_s"] = round(time.monotonic() - started, 2)
        self.store.commit_stage(self.run_id, k, stage, output)
        self.reporter.stage_done(k, stage, output)
        return output

    def _in_flight(self, app: str) -> int:
        """Shards in flight for an app: two per replica it may have (one running, the next queued
        behind it, so no replica idles between shards), at most fanout.max_in_flight. More would
        only wait in a replica's queue, their deadlines running."""
        scaling = getattr(self.config.serve, app)
        replicas = scaling.autoscaling.max_replicas if scaling.autoscaling else scaling.replicas
        return max(1, min(self.config.fanout.max_in_flight, 2 * replicas))

    def _uri(self, k: int, name: str) -> str:
        return self.store.dataset_uri(self.run_id, k, name)

    def _sampling(
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

    def _train(self, k: int, base_model: str, dataset_uri: str, epochs: int, output_uri: str | None = None) -> dict:
        t = self.config.training
        request = trainer_pb2.StartTrainingRequest(
            context=self._ctx(k),
            base_model_uri=base_model,
            train_tasks=uri_source(dataset_uri),
            output_model_uri=output_uri or self.store.model_uri(self.run_id, k),
            params=trainer_pb2.TrainingParams(
                epochs=epochs,
                max_steps=t.max_steps,
                learning_rate=t.learning_rate,
                batch_size=t.batch_size,
                max_seq_len=t.max_seq_len,
                num_workers=t.num_workers,
                use_gpu=t.use_gpu,
                seed=self.config.seed + k,
                augmented_tag=self.config.backtranslation.tag,
            ),
        )
        status = self.clients.wait_for_training(
            request,
            poll_s=t.poll_interval_s,
            on_progress=lambda s: self.reporter.training(k, s.step, s.total_steps, s.loss),
        )
        return {
            "model_uri": status.model_uri,
            "base_model": base_model,  # the model this round fine-tuned (training.from_base)
            "job_id": status.job_id,
            "steps": status.step,
            "final_loss": status.loss,
            "losses": list(status.losses),
            "examples": status.train_examples,
            "real_token_share": status.real_token_share,
            "resumed_from_step": status.resumed_from_step,
        }

    def _evaluate(self, k: int, model_uri: str, heldout_uri: str) -> dict:
        """The held-out tasks in shards over the evaluator replicas; the shards' scores combine into the
        same means one request would give."""
        e, f = self.config.evaluation, self.config.fanout
        tasks = self.store.read_tasks(heldout_uri)
        total = sum(min(len(t.instances), e.max_instances_per_task or len(t.instances)) for t in tasks)
        progress: dict[int, int] = {}

        def send(shard) -> evaluator_pb2.EvaluateModelResponse:
            def on_progress(done: int, _total: int) -> None:
                progress[shard.index] = done
                self.reporter.evaluation(k, sum(progress.values()), total)

            return self.clients.stream_evaluation(
                evaluator_pb2.EvaluateModelRequest(
                    context=self._ctx(k),
                    model_uri=model_uri,
                    eval_tasks=uri_source(shard.input_uri),
                    max_instances_per_task=e.max_instances_per_task,
                    with_nll=e.with_nll,
                    sampling=common_pb2.Sampling(temperature=0.0, top_p=1.0, max_new_tokens=e.max_new_tokens),
                    predictions_uri=shard.output_uri,
                ),
                on_progress=on_progress,
            )

        sharded = ShardedStage(self.store, self.run_id, k, "evaluate", self._in_flight("evaluator"))
        shards = sharded.shards(tasks, f.tasks_per_shard, write_inputs=True)
        parts = sharded.run(shards, send, evaluator_pb2.EvaluateModelResponse)
        predictions_uri = self._uri(k, "eval_predictions")
        sharded.join([p.predictions.uri for p in parts], predictions_uri)
        response = combine(parts)
        per_task = {t.task_id: (t.score if e.promotion_metric == "score" else t.rouge_l) for t in response.tasks}
        interval = mean_interval(per_task, e.bootstrap_resamples, e.confidence)
        return {
            "model_uri": model_uri,
            "metric": e.promotion_metric,
            "score": response.score,
            "rouge_l": response.rouge_l,
            "exact_match": response.exact_match,
            "nll": response.nll,
            "interval": [interval.low, interval.high],
            "confidence": e.confidence,
            "num_tasks": response.num_tasks,
            "num_instances": response.num_instances,
            "categories": {c.category: c.score for c in response.categories},
            "per_task": per_task,
            "predictions_uri": predictions_uri,
            "shards": len(shards),
        }

    def _promote(self, k: int, candidate: dict, incumbent: dict | None) -> dict:
        e = self.config.evaluation
        decision = decide(
            candidate["per_task"],
            incumbent["per_task"] if incumbent and incumbent.get("per_task") else None,
            metric=e.promotion_metric,
            margin=e.promote_margin,
            confidence=e.confidence,
            resamples=e.bootstrap_resamples,
            seed=self.config.seed + k,
        )
        chosen = candidate if decision.promoted or incumbent is None else incumbent
        return {
            **decision.to_dict(),
            "model_uri": chosen["model_uri"],
            "per_task": chosen["per_task"],
            "candidate_model_uri": candidate["model_uri"],
        }

    def _judge(self, k: int, incumbent: dict, candidate: dict, heldout_uri: str) -> dict:
        e = self.config.evaluation
        response = self.clients.compare_models(
            evaluator_pb2.CompareModelsRequest(
                context=self._ctx(k),
                model_a_uri=incumbent["model_uri"],
                model_b_uri=candidate["model_uri"],
                eval_tasks=uri_source(heldout_uri),
                max_instances_per_task=e.max_instances_per_task,
                sampling=common_pb2.Sampling(temperature=0.0, top_p=1.0, max_new_tokens=e.max_new_tokens),
                judge_model_uri=e.judge_model,
                bootstrap_resamples=e.bootstrap_resamples,
                confidence=e.confidence,
            )
        )
        d = response.score_difference
        return {
            "win_rate": response.win_rate,
            "tie_rate": response.tie_rate,
            "loss_rate": response.loss_rate,
            "judged_pairs": response.judged_pairs,
            "score_difference": [d.estimate, d.low, d.high],
        }

    def _test(self, k: int, split: dict, final_model: str) -> dict:
        """Model 0 and the final model on the test tasks, which chose nothing: the honest score."""
        e = self.config.evaluation
        first = self.store.stage_output(self.run_id, 0, "evaluate")["model_uri"]
        response = self.clients.compare_models(
            evaluator_pb2.CompareModelsRequest(
                context=self._ctx(k),
                model_a_uri=first,
                model_b_uri=final_model,
                eval_tasks=uri_source(split["seed_test_uri"]),
                max_instances_per_task=e.max_instances_per_task,
                sampling=common_pb2.Sampling(temperature=0.0, top_p=1.0, max_new_tokens=e.max_new_tokens),
                bootstrap_resamples=e.bootstrap_resamples,
                confidence=e.confidence,
            )
        )
        d = response.score_difference
        return {
            "model_0": first,
            "final_model": final_model,
            "model_0_score": response.a.score,
            "final_score": response.b.score,
            "difference": [d.estimate, d.low, d.high],
            "confidence": e.confidence,
            "num_tasks": response.b.num_tasks,
        }

    def _machine_pool(self, up_to_round: int) -> list[TaskRecord]:
        """Everything a filter stage kept in rounds 1 .. up_to_round-1."""
        return [t for k in range(1, up_to_round) for t in self._stage_tasks(k, "filter", "kept_uri")]

    # ---- instruction backtranslation -----------------------------------------------------------
    def _backward_model(self, split: dict) -> str:
        b = self.config.backtranslation
        data = self._stage(
            0,
            "backward_data",
            lambda: self._write(0, "backward_train", backward_tasks(self.store.read_tasks(split["seed_train_uri"]))),
        )
        trained = self._stage(
            0,
            "backward_train",
            lambda: self._train(
                0,
                self.config.model.base,
                data["uri"],
                b.backward_epochs,
                output_uri=self.store.uri(self.run_id, "round-000", "backward_model"),
            ),
        )
        return trained["model_uri"]

    def _write(self, k: int, name: str, tasks: list[TaskRecord]) -> dict:
        uri = self._uri(k, name)
        self.store.write_tasks(uri, tasks)
        return {"uri": uri, "count": len(tasks)}

    def _backtranslation_round(self, k: int, model: str, backward_model: str) -> dict:
        b = self.config.backtranslation

        def segments() -> dict:
            pieces = sample_segments(
                load_segments(b.corpus, b.min_chars, b.max_chars), b.segments_per_round, self.config.seed + k
            )
            tasks = [
                TaskRecord(
                    id=stable_id(self.run_id, k, "segment", i),
                    instruction="",
                    instances=[Instance("", text)],
                    lineage=Lineage(run_id=self.run_id, round=k, stage="unlabelled", model="corpus"),
                )
                for i, text in enumerate(pieces)
            ]
            return {
                **self._write(k, "segments", tasks),
                "corpus": b.corpus if isinstance(b.corpus, str) else list(b.corpus),
            }

        segs = self._stage(k, "segments", segments)
        augmented = self._stage(
            k,
            "backtranslate",
            lambda: self._sharded(
                k,
                "backtranslate",
                "augmented",
                segs,
                lambda shard_uri, output_uri: self.clients.backtranslate(
                    generator_pb2.BacktranslateRequest(
                        context=self._ctx(k),
                        model_uri=backward_model,
                        segment_tasks=uri_source(shard_uri),
                        sampling=self._sampling(b.max_new_tokens, self.config.seed + k),
                        output_uri=output_uri,
                    )
                ),
            ),
        )
        to_rate = self._stage(k, "rating_pool", lambda: self._rating_pool(k, augmented))
        curated = self._stage(
            k,
            "curate",
            lambda: self._sharded(
                k,
                "curate",
                "curated",
                to_rate,
                lambda shard_uri, output_uri: self.clients.curate_examples(
                    generator_pb2.CurateExamplesRequest(
                        context=self._ctx(k),
                        model_uri=model,
                        tasks=uri_source(shard_uri),
                        sampling=self._sampling(b.curation_max_new_tokens, self.config.seed + k, temperature=0.0),
                        output_uri=output_uri,
                    )
                ),
            ),
        )
        threshold = b.curation_threshold_first_round if k == 1 else b.curation_threshold_later

        def filter_augmented() -> dict:
            if curated["count"] == 0:
                return {
                    "kept_uri": "",
                    "kept_count": 0,
                    "rejected_uri": "",
                    "candidates": 0,
                    "funnel": {},
                    "curation_threshold": threshold,
                    "scores": {},
                }
            f = self.config.filter
            response = self.clients.filter_tasks(
                filter_pb2.FilterTasksRequest(
                    context=self._ctx(k),
                    candidates=uri_source(curated["uri"]),
                    rouge_l_threshold=1.0,
                    min_instruction_words=f.min_instruction_words,
                    max_instruction_words=f.max_instruction_words,
                    decontaminate_against=uri_source(
                        self.store.stage_output(self.run_id, 0, "split")["seed_heldout_uri"]
                    ),
                    decontamination_ngram=f.decontamination_ngram,
                    near_duplicate_threshold=f.near_duplicate_threshold,
                    min_curation_score=threshold,
                    kept_uri=self._uri(k, "augmented_kept"),
                    rejected_uri=self._uri(k, "augmented_rejected"),
                )
            )
            scores = [t.lineage.scores.get("curation", 0.0) for t in self.store.read_tasks(curated["uri"])]
            return {
                "kept_uri": response.kept_ref.uri,
                "kept_count": response.kept_count,
                "rejected_uri": response.rejected_ref.uri,
                "candidates": response.candidates,
                "funnel": {step.rule: step.removed for step in response.funnel},
                "curation_threshold": threshold,
                "scores": {str(n): scores.count(float(n)) for n in range(6)},
            }

        return self._stage(k, "filter_augmented", filter_augmented)

    def _rating_pool(self, k: int, augmented: dict) -> dict:
        """What model k rates: every pair backtranslated so far (Humpback rescores the whole augmented
        set with each iteration's model), or only this round's new pairs."""
        rounds = range(1, k + 1) if self.config.backtranslation.rescore_all else [k]
        pairs = [t for j in rounds for t in self._stage_tasks(j, "backtranslate", "uri")]
        return {**self._write(k, "rating_pool", pairs), "rounds": list(rounds)}

    def _stage_tasks(self, k: int, stage: str, key: str) -> list[TaskRecord]:
        out = self.store.stage_output(self.run_id, k, stage)
        return (
            self.store.read_tasks(out[key]) if out and out.get(key) and out.get("count", out.get("kept_count")) else []
        )

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.store.remove_stale_temporaries(self.run_id):
            log.info("removed temporary files a killed run left behind")
        started = self.store.load_manifest(self.run_id).get("started_at") or time.time()
        self.store.update_run(
            self.run_id, config=self.config.model_dump(), status="running", started_at=started, stop_requested=False
        )
        seeds = load_seed_tasks(self.config.seeds.path)  # a malformed file fails here, before any stage
        for path in self.config.evaluation.extra_sets:
            load_tasks(path)
        split = self._stage(0, "split", lambda: self._split(seeds))
        promoted = self._bootstrap(split) if self.config.loop.bootstrap else self._base_model(split)
        self._promoted(promoted)
        backward = self._backward_model(split) if self.config.backtranslation.enabled else None
        k, rounds_without_promotion = 0, 0
        while (stop := self._stop_reason(k, rounds_without_promotion)) is None:
            k += 1
            decision = self._round(k, split, promoted, backward)
            rounds_without_promotion = 0 if decision["promoted"] else rounds_without_promotion + 1
            promoted = decision
            self._promoted(promoted)
        log.info("stopping after round %d: %s", k, stop)
        if split.get("test_tasks"):
            self._stage(k, "test", lambda: self._test(k, split, promoted["model_uri"]))
        self.store.update_run(self.run_id, status="succeeded", final_model=promoted["model_uri"], stopped_because=stop)
        self._write_report()
        return self.store.load_manifest(self.run_id)

    def _stop_reason(self, rounds_done: int, rounds_without_promotion: int) -> str | None:
        """Why no further round starts, or None. A run with loop.rounds > 0 stops after them; a
        continuous one (0) when `reinstruct stop` asked it to, after loop.patience rounds without a
        promotion, or once loop.time_budget_s has passed since the run first started."""
        loop = self.config.loop
        manifest = self.store.load_manifest(self.run_id)
        if manifest.get("stop_requested"):
            return "stop requested"
        if loop.rounds:
            return f"{loop.rounds} rounds done" if rounds_done >= loop.rounds else None
        if rounds_without_promotion >= loop.patience:
            return f"no promotion in {loop.patience} rounds in a row"
        if loop.time_budget_s and time.time() - manifest.get("started_at", time.time()) >= loop.time_budget_s:
            return f"time budget of {loop.time_budget_s:.0f}s spent"
        return None

    def _promoted(self, decision: dict) -> None:
        """The model the loop stands on now, for `reinstruct status` and the OpenAI endpoint's run:<id>."""
        self.store.update_run(self.run_id, promoted_model=decision["model_uri"])

    def _write_report(self) -> None:
        uri = write_report(self.store, self.run_id)
        self.reporter.report(uri)

    def _split(self, seeds: list[TaskRecord]) -> dict:
        """Seed tasks split by task into train and held-out; held-out into dev (the gate decides on it)
        and test (nothing decides on it: evaluated once, at the end)."""
        s = self.config.seeds
        train, heldout = split_by_task(seeds, s.heldout_fraction, s.split_seed)
        for path in self.config.evaluation.extra_sets:  # user evaluation sets: held out as whole tasks too
            heldout += [replace(t, id=f"{Path(path).stem}:{t.id}") for t in load_tasks(path)]
        dev, test = (
            split_by_task(heldout, self.config.evaluation.test_fraction, s.split_seed + 1)
            if self.config.evaluation.test_fraction
            else (heldout, [])
        )
        for name, tasks in (
            ("seed_train", train),
            ("seed_heldout", heldout),
            ("seed_dev", dev),
            ("seed_test", test),
            ("seed_all", seeds),
        ):
            self.store.write_tasks(self._uri(0, name), tasks)
        return {
            "seed_train_uri": self._uri(0, "seed_train"),
            "seed_heldout_uri": self._uri(0, "seed_heldout"),
            "seed_dev_uri": self._uri(0, "seed_dev"),
            "seed_test_uri": self._uri(0, "seed_test"),
            "seed_all_uri": self._uri(0, "seed_all"),
            "train_tasks": len(train),
            "heldout_tasks": len(heldout),
            "dev_tasks": len(dev),
            "test_tasks": len(test),
            "dev_task_ids": sorted(t.id for t in dev),
            "test_task_ids": sorted(t.id for t in test),
        }

    def _train_mix(self, k: int, split: dict, machine: list[TaskRecord], augmented: list[TaskRecord]) -> dict:
        human = self.store.read_tasks(split["seed_train_uri"])
        meta = []
        if self.config.training.meta_tasks:  # teach the Self-Instruct and rating formats themselves
            meta = build_meta_tasks(
                human,
                machine,
                seed=self.config.seed + k,
                examples_per_task=self.config.training.bootstrap_examples_per_task,
            )
            if self.config.backtranslation.enabled:  # the forward model also rates pairs (self-curation)
                meta += curation_meta_tasks(human, seed=self.config.seed + k)
        mix = human + machine + augmented + meta
        uri = self._uri(k, "train_mix")
        self.store.write_tasks(uri, mix)
        return {
            "uri": uri,
            "count": len(mix),
            "seed": len(human),
            "machine": len(machine),
            "augmented": len(augmented),
            "meta": len(meta),
        }

    def _bootstrap(self, split: dict) -> dict:
        data = self._stage(0, "train_data", lambda: self._train_mix(0, split, [], []))
        trained = self._stage(
            0,
            "train",
            lambda: self._train(0, self.config.model.base, data["uri"], self.config.training.bootstrap_epochs),
        )
        score = self._stage(0, "evaluate", lambda: self._evaluate(0, trained["model_uri"], split["seed_dev_uri"]))
        decision = self._stage(0, "promote", lambda: self._promote(0, score, None))
        self._write_report()
        return decision

    def _base_model(self, split: dict) -> dict:
        """Model 0 is the base model itself: evaluated like every later model, so round 1 must beat it."""
        score = self._stage(0, "evaluate", lambda: self._evaluate(0, self.config.model.base, split["seed_dev_uri"]))
        decision = self._stage(0, "promote", lambda: self._promote(0, score, None))
        self._write_report()
        return decision

    def _round(self, k: int, split: dict, promoted: dict, backward_model: str | None) -> dict:
        g = self.config.generation
        model = promoted["model_uri"]
        machine = self._machine_pool(k)

        def generate() -> dict:
            """Self-Instruct's bootstrap: prompts go out pool_refresh_prompts at a time (each batch in
            shards of fanout.prompts_per_shard, concurrently); after each batch the new instructions that
            pass the ROUGE-L and instruction rules join the machine tasks shown in context, so later
            prompts of the round see earlier ones (the reference's request batches)."""
            in_context, written, truncated = list(machine), [], 0
            f = self.config.fanout
            for start in range(0, g.num_prompts, g.pool_refresh_prompts):
                batch = list(range(start, min(start + g.pool_refresh_prompts, g.num_prompts)))
                sharded = ShardedStage(
                    self.store, self.run_id, k, f"generate_instructions/batch-{start:05d}", self._in_flight("generator")
                )
                pool_uri = sharded.uri("pool.parquet")
                self.store.write_tasks(pool_uri, in_context)
                shards = sharded.shards(batch, f.prompts_per_shard)
                responses = sharded.run(
                    shards,
                    lambda shard, pool_uri=pool_uri: self.clients.generate_instructions(
                        generator_pb2.GenerateInstructionsRequest(
                            context=self._ctx(k),
                            model_uri=model,
                            seed_tasks=uri_source(split["seed_train_uri"]),
                            machine_tasks=uri_source(pool_uri),
                            num_prompts=len(shard.items),
                            num_human_in_context=g.num_human_in_context,
                            num_machine_in_context=g.num_machine_in_context,
                            sampling=self._sampling(
                                g.max_new_tokens, self.config.seed + k, presence_penalty=g.presence_penalty
                            ),
                            first_prompt_index=shard.items[0],
                            output_uri=shard.output_uri,
                        )
                    ),
                    generator_pb2.GenerateInstructionsResponse,
                    on_shard=lambda done, total: self.reporter.shards(k, "generate_instructions", done, total),
                )
                new = [t for r in responses for t in self.store.read_tasks(r.output.uri)]
                written += new
                truncated += sum(r.completions_truncated for r in responses)
                if new and batch[-1] + 1 < g.num_prompts:
                    in_context += self._novel_instructions(k, split, in_context, new)
            self.store.write_tasks(self._uri(k, "instructions"), written)
            return {
                "uri": self._uri(k, "instructions"),
                "count": len(written),
                "prompts": g.num_prompts,
                "truncated": truncated,
                "model_uri": model,
                "in_context_pool": len(in_context),
            }

        instructions = self._stage(k, "generate_instructions", generate)
        if instructions["count"] == 0:
            log.warning("round %d: the model wrote no parseable instructions; this round adds no data", k)
        classified = self._stage(
            k,
            "classify",
            lambda: self._sharded(
                k,
                "classify",
                "classified",
                instructions,
                lambda shard_uri, output_uri: self.clients.classify_instructions(
                    generator_pb2.ClassifyInstructionsRequest(
                        context=self._ctx(k), model_uri=model, tasks=uri_source(shard_uri), output_uri=output_uri
                    )
                ),
            ),
        )
        candidates = self._stage(
            k,
            "generate_instances",
            lambda: self._sharded(
                k,
                "generate_instances",
                "candidates",
                classified,
                lambda shard_uri, output_uri: self.clients.generate_instances(
                    generator_pb2.GenerateInstancesRequest(
                        context=self._ctx(k),
                        model_uri=model,
                        tasks=uri_source(shard_uri),
                        demonstrations=uri_source(split["seed_train_uri"]),
                        num_demonstrations=g.num_demonstrations,
                        sampling=self._sampling(
                            g.instance_max_new_tokens,
                            self.config.seed + k,
                            g.instance_temperature,
                            g.instance_presence_penalty,
                        ),
                        output_uri=output_uri,
                    )
                ),
            ),
        )
        filtered = self._stage(k, "filter", lambda: self._filter(k, split, machine, candidates))
        augmented: list[TaskRecord] = []
        if backward_model is not None:
            self._backtranslation_round(k, model, backward_model)
            # rescoring: this round's ratings alone choose the augmented set; else every round's choice adds up
            rounds = [k] if self.config.backtranslation.rescore_all else range(1, k + 1)
            augmented = [t for j in rounds for t in self._stage_tasks(j, "filter_augmented", "kept_uri")]
        data = self._stage(
            k,
            "train_data",
            lambda: self._train_mix(
                k,
                split,
                machine + (self.store.read_tasks(filtered["kept_uri"]) if filtered["kept_count"] else []),
                augmented,
            ),
        )
        start_from = self.config.model.base if self.config.training.from_base else model
        trained = self._stage(k, "train", lambda: self._train(k, start_from, data["uri"], self.config.training.epochs))
        score = self._stage(k, "evaluate", lambda: self._evaluate(k, trained["model_uri"], split["seed_dev_uri"]))
        if self.config.evaluation.judge:
            self._stage(k, "judge", lambda: self._judge(k, promoted, score, split["seed_dev_uri"]))
        decision = self._stage(k, "promote", lambda: self._promote(k, score, promoted))
        self._write_report()
        return decision

    def _novel_instructions(
        self, k: int, split: dict, pool: list[TaskRecord], new: list[TaskRecord]
    ) -> list[TaskRecord]:
        """The new instructions that pass the instruction rules and ROUGE-L < threshold against seeds + pool."""
        f = self.config.filter
        response = self.clients.filter_tasks(
            filter_pb2.FilterTasksRequest(
                context=self._ctx(k),
                candidates=tasks_to_source(new),
                pool=self._written(k, "refresh_pool", self.store.read_tasks(split["seed_all_uri"]) + pool),
                instructions_only=True,
                rouge_l_threshold=f.rouge_l_threshold,
                min_instruction_words=f.min_instruction_words,
                max_instruction_words=f.max_instruction_words,
                reject_only_above_threshold=f.reject_only_above_threshold,
            )
        )
        return [task_from_proto(t) for t in response.kept]

    def _written(self, k: int, name: str, tasks: list[TaskRecord]) -> common_pb2.TaskSource:
        self.store.write_tasks(self._uri(k, name), tasks)
        return uri_source(self._uri(k, name))

    def _sharded(self, k: int, stage: str, name: str, previous: dict, call: Callable[[str, str], object]) -> dict:
        """The previous stage's tasks in shards of fanout.tasks_per_shard, sent concurrently:
        call(input_uri, output_uri) is one request. Nothing is sent for an empty input (services
        reject empty batches)."""
        uri = self._uri(k, name)
        if previous["count"] == 0:
            self.store.write_tasks(uri, [])
            return {"uri": uri, "count": 0, "shards": 0}
        f = self.config.fanout
        sharded = ShardedStage(self.store, self.run_id, k, stage, self._in_flight("generator"))
        shards = sharded.shards(self.store.read_tasks(previous["uri"]), f.tasks_per_shard, write_inputs=True)
        responses = sharded.run(
            shards,
            lambda shard: call(shard.input_uri, shard.output_uri),
            generator_pb2.TasksResponse,
            on_shard=lambda done, total: self.reporter.shards(k, stage, done, total),
        )
        count = sharded.join([r.output.uri for r in responses], uri)
        return {"uri": uri, "count": count, "shards": len(shards)}

    def _filter(self, k: int, split: dict, machine: list[TaskRecord], candidates: dict) -> dict:
        if candidates["count"] == 0:
            return {
                "kept_uri": "",
                "kept_count": 0,
                "rejected_uri": "",
                "candidates": 0,
                "funnel": {},
                "max_rouge_l": [],
            }
        pool_uri = self._uri(k, "filter_pool")
        self.store.write_tasks(pool_uri, self.store.read_tasks(split["seed_all_uri"]) + machine)
        f = self.config.filter
        pool_scores = self._pool_scores(k, candidates["uri"], pool_uri)
        response = self.clients.filter_tasks(
            filter_pb2.FilterTasksRequest(
                context=self._ctx(k),
                candidates=uri_source(candidates["uri"]),
                pool=uri_source(pool_uri) if pool_scores is None else None,
                pool_scores=pool_scores,
                rouge_l_threshold=f.rouge_l_threshold,
                min_instruction_words=f.min_instruction_words,
                max_instruction_words=f.max_instruction_words,
                kept_uri=self._uri(k, "kept"),
                decontaminate_against=uri_source(split["seed_heldout_uri"]),
                decontamination_ngram=f.decontamination_ngram,
                near_duplicate_threshold=f.near_duplicate_threshold,
                min_curation_score=f.min_curation_score,
                reject_only_above_threshold=f.reject_only_above_threshold,
                rejected_uri=self._uri(k, "rejected"),
            )
        )
        return {
            "kept_uri": response.kept_ref.uri,
            "kept_count": response.kept_count,
            "rejected_uri": response.rejected_ref.uri,
            "candidates": response.candidates,
            "funnel": {step.rule: step.removed for step in response.funnel},
            "max_rouge_l": [v.max_rouge_l for v in response.verdicts],
        }

    def _pool_scores(self, k: int, candidates_uri: str, pool_uri: str) -> list[filter_pb2.NoveltyScore] | None:
        """The filter's parallel part, when the candidates fill more than one shard: each shard's max
        ROUGE-L against the pool on whichever filter replica is free; FilterTasks then runs only the
        sequential part (candidates against those kept before them)."""
        f = self.config.fanout
        tasks = self.store.read_tasks(candidates_uri)
        if len(tasks) <= f.filter_candidates_per_shard:
            return None
        sharded = ShardedStage(self.store, self.run_id, k, "filter", self._in_flight("filter"))
        shards = sharded.shards(tasks, f.filter_candidates_per_shard, write_inputs=True)
        responses = sharded.run(
            shards,
            lambda shard: self.clients.score_novelty(
                filter_pb2.ScoreNoveltyRequest(
                    context=self._ctx(k), candidates=uri_source(shard.input_uri), pool=uri_source(pool_uri)
                )
            ),
            filter_pb2.ScoreNoveltyResponse,
            on_shard=lambda done, total: self.reporter.shards(k, "filter", done, total),
        )
        return [score for r in responses for score in r.scores]


def summarize(manifest: dict) -> list[dict]:
    """One row per round: generated, kept by each filter, train loss, eval score, promotion."""
    rows = []
    for key in sorted(manifest.get("rounds", {}), key=int):
        stages = manifest["rounds"][key]["stages"]
        gen, filt = stages.get("generate_instructions", {}), stages.get("filter", {})
        rows.append(
            {
                "round": int(key),
                "instructions": gen.get("count"),
                "with_instances": stages.get("generate_instances", {}).get("count"),
                "kept": filt.get("kept_count"),
                "funnel": filt.get("funnel"),
                "augmented_kept": stages.get("filter_augmented", {}).get("kept_count"),
                "train_examples": stages.get("train_data", {}).get("count"),
                "final_loss": stages.get("train", {}).get("final_loss"),
                "rouge_l": stages.get("evaluate", {}).get("rouge_l"),
                "score": stages.get("evaluate", {}).get("score"),
                "promoted": stages.get("promote", {}).get("promoted"),
            }
        )
    return rows


def refuse_store_inside_job_package(root: str) -> None:
    """Under `ray job submit --working-dir`, the working directory is Ray's unpacked package
    (.../runtime_resources/working_dir_files/_ray_pkg_<hash>/): a relative store root would put the
    whole run there, invisible to the user and lost to the next cluster session."""
    if "://" in root or os.path.isabs(os.path.expanduser(root)):
        return
    if "_ray_pkg_" in os.getcwd():
        raise SystemExit(
            f"store.root {root!r} is relative, and this driver runs inside Ray's job package "
            f"({os.getcwd()}): give an absolute path every process of the run can reach (a shared "
            "volume on a multi-node cluster) or an object-store URI, e.g. --store-root /data/runs"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: every built-in default)")
    parser.add_argument(
        "--settings-b64",
        default=None,
        help="the settings every Serve app got (base64 JSON, as the Helm chart passes them); instead of --config",
    )
    parser.add_argument("--run-id", default="demo")
    parser.add_argument("--rounds", type=int, default=None, help="override loop.rounds")
    parser.add_argument("--store-root", default=None, help="override store.root")
    parser.add_argument("--no-deploy", action="store_true", help="use apps already deployed (e.g. a RayService)")
    parser.add_argument("--grpc-target", default=None, help="host:port of Serve's gRPC proxy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.settings_b64:
        config = parse_config(json.loads(base64.b64decode(args.settings_b64)), "--settings-b64")
    else:
        config = load_config(args.config)
    if args.rounds is not None:
        config.loop.rounds = args.rounds
    if args.store_root is not None:
        config.store.root = args.store_root
    refuse_store_inside_job_package(config.store.root)
    from services.serving import connect_ray, deploy_apps

    connect_ray()
    if not args.no_deploy:
        deploy_apps(config)
    target = args.grpc_target or f"{config.serve.host}:{config.serve.grpc_port}"
    clients = ServiceClients(target, config.serve.request_timeout_s)
    manifest = LoopDriver(config, clients, args.run_id).run()
    for row in summarize(manifest):
        print(row)
    print(f"run store: {RunStore(config.store.root).uri(args.run_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
