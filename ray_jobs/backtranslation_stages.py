"""Instruction backtranslation (Li et al. 2023, "Humpback"): a backward model trained on
(output -> instruction) writes instructions for unlabelled text; the round's model rates every pair
1-5 (self-curation), and only the best join the training data. The same rater scores matched and
shuffled dev seed pairs each round: a round whose rater cannot tell them apart adds nothing."""

from __future__ import annotations

import logging

from ray_jobs.manifest import CurationControl, Dataset, Filtered, RatingPool, Segments, Split, Trained
from services.api import filter_pb2, generator_pb2
from services.common import prompts
from services.common.convert import uri_source
from services.common.records import Instance, Lineage, TaskRecord, stable_id
from services.common.sections import to_message
from services.generator.backtranslation import backward_tasks, control_pairs, rater_auc, selection_threshold
from services.generator.corpus import load_segments, sample_segments

from . import model_stages
from .run import Run

log = logging.getLogger("reinstruct.loop")


def backward_model(run: Run, split: Split) -> str:
    """Round 0: the backward model, fine-tuned once from the base model on the seed tasks turned round."""
    data = run.stage(
        0,
        "backward_data",
        lambda: run.write(0, "backward_train", backward_tasks(run.seed_training_tasks(split))),
        Dataset,
    )
    trained = run.stage(
        0,
        "backward_train",
        lambda: model_stages.train(
            run,
            0,
            run.config.model.base,
            data.uri,
            run.config.backtranslation.backward_epochs,
            output_uri=run.store.uri(run.run_id, "round-000", "backward_model"),
        ),
        Trained,
    )
    return trained.model_uri


def backtranslation_round(run: Run, k: int, model: str, backward: str, heldout_uri: str) -> Filtered:
    """Segments -> backtranslated pairs -> every pair so far rated by model k -> the best kept."""
    b = run.config.backtranslation
    segments = run.stage(k, "segments", lambda: _segments(run, k), Segments)
    run.stage(
        k,
        "backtranslate",
        lambda: run.sharded(
            k,
            "backtranslate",
            "augmented",
            segments,
            lambda shard_uri, output_uri: run.clients.backtranslate(
                generator_pb2.BacktranslateRequest(
                    context=run.ctx(k),
                    model_uri=backward,
                    segment_tasks=uri_source(shard_uri),
                    sampling=run.sampling(b.max_new_tokens, run.config.seed + k),
                    output_uri=output_uri,
                )
            ),
        ),
        Dataset,
    )
    to_rate = run.stage(k, "rating_pool", lambda: _rating_pool(run, k), RatingPool)
    curated = run.stage(k, "curate", lambda: _rate(run, k, model, "curate", "curated", to_rate), Dataset)
    control = run.stage(k, "curation_control", lambda: _control(run, k, model), CurationControl)
    return run.stage(k, "filter_augmented", lambda: _keep_the_best(run, k, curated, control, heldout_uri), Filtered)


def _rate(run: Run, k: int, model: str, stage: str, name: str, tasks: Dataset) -> Dataset:
    """Model k rates every task of `tasks` with the configured rater, in shards."""
    return run.sharded(
        k,
        stage,
        name,
        tasks,
        lambda shard_uri, output_uri: run.clients.curate_examples(
            generator_pb2.CurateExamplesRequest(
                context=run.ctx(k),
                model_uri=model,
                tasks=uri_source(shard_uri),
                output_uri=output_uri,
                rater=run.config.backtranslation.curation,
            )
        ),
    )


def _control(run: Run, k: int, model: str) -> CurationControl:
    """The rater on matched dev seed pairs and their shuffled twins: dev, because model k has trained
    on the seed training tasks (its matched pairs would look better than any new pair); the test
    tasks stay untouched. Rating trains nothing; one bit per round (add augmented data or not)
    depends on it."""
    b = run.config.backtranslation
    split = run.committed(0, "split", Split)
    pairs = control_pairs(run.store.read_tasks(split.seed_dev_uri), b.control_pairs, run.config.seed + k)
    rated = _rate(run, k, model, "curation_control", "control_rated", run.write(k, "control_pairs", pairs))
    by_kind: dict[bool, list[float]] = {True: [], False: []}
    for task in rated.tasks(run.store):
        by_kind[task.lineage.scores.get("matched") == 1.0].append(task.lineage.scores.get("curation", 0.0))
    matched, shuffled = by_kind[True], by_kind[False]
    auc = rater_auc(matched, shuffled)
    return CurationControl(
        uri=rated.uri,
        count=rated.count,
        shards=rated.shards,
        rater=b.curation,
        auc=None if auc is None else round(auc, 4),
        matched=len(matched),
        shuffled=len(shuffled),
        matched_mean=round(sum(matched) / max(len(matched), 1), 4),
        shuffled_mean=round(sum(shuffled) / max(len(shuffled), 1), 4),
    )


def _segments(run: Run, k: int) -> Segments:
    b = run.config.backtranslation
    pieces = sample_segments(
        load_segments(b.corpus, b.min_chars, b.max_chars), b.segments_per_round, run.config.seed + k
    )
    tasks = [
        TaskRecord(
            id=stable_id(run.run_id, k, "segment", i),
            instruction="",
            instances=[Instance("", text)],
            lineage=Lineage(run_id=run.run_id, round=k, stage="unlabelled", model="corpus"),
        )
        for i, text in enumerate(pieces)
    ]
    written = run.write(k, "segments", tasks)
    return Segments(
        uri=written.uri, count=written.count, corpus=b.corpus if isinstance(b.corpus, str) else list(b.corpus)
    )


def _rating_pool(run: Run, k: int) -> RatingPool:
    """What model k rates: every pair backtranslated so far (Humpback rescores the whole augmented set
    with each iteration's model), or only this round's new pairs."""
    rounds = list(range(1, k + 1)) if run.config.backtranslation.rescore_all else [k]
    pairs = [t for j in rounds for t in run.committed(j, "backtranslate", Dataset).tasks(run.store)]
    written = run.write(k, "rating_pool", pairs)
    return RatingPool(uri=written.uri, count=written.count, rounds=rounds)


def _keep_the_best(run: Run, k: int, curated: Dataset, control: CurationControl, heldout_uri: str) -> Filtered:
    """The best-rated pairs, through the filter's other rules (decontamination, near duplicates; no
    ROUGE-L novelty: the instructions are the backward model's). Humpback keeps score >= k (5); a
    rubric rating read from probabilities is an expected score that seldom reaches it, and PMI has no
    such point, so otherwise the best kept_share are kept (selection_threshold). None are kept when
    the rater failed its control."""
    b = run.config.backtranslation
    k_threshold = b.curation_threshold_first_round if k == 1 else b.curation_threshold_later
    scores = [t.lineage.scores.get("curation", 0.0) for t in curated.tasks(run.store)]
    record = dict(
        rater=b.curation,
        rater_auc=control.auc,
        kept_share=b.kept_share,
        scores={str(n): sum(1 for s in scores if round(s) == n) for n in prompts.CURATION_SCORES},
    )
    if curated.count == 0:
        return Filtered(curation_threshold=k_threshold, **record)
    if control.auc is None:
        log.warning("round %d: no control pairs (backtranslation.control_pairs, dev tasks): the rater is unchecked", k)
    elif control.auc < b.min_rater_auc:
        log.warning(
            "round %d: the %s rater's AUC on %d matched and %d shuffled seed pairs is %.3f, below "
            "backtranslation.min_rater_auc %.3f: this round adds no augmented data",
            k,
            b.curation,
            control.matched,
            control.shuffled,
            control.auc,
            b.min_rater_auc,
        )
        return Filtered(
            candidates=curated.count, curation_threshold=k_threshold, selection="rater_below_floor", **record
        )
    selection, threshold = selection_threshold(scores, b.curation, k_threshold, b.kept_share)
    response = run.clients.filter_tasks(
        filter_pb2.FilterTasksRequest(
            context=run.ctx(k),
            candidates=uri_source(curated.uri),
            # curation decides here, not novelty: ROUGE-L drops only exact repeats
            filter=to_message(
                run.config.filter.model_copy(update={"rouge_l_threshold": 1.0, "min_curation_score": threshold})
            ),
            decontaminate_against=uri_source(heldout_uri),
            kept_uri=run.uri(k, "augmented_kept"),
            rejected_uri=run.uri(k, "augmented_rejected"),
        )
    )
    return Filtered(
        kept_uri=response.kept_ref.uri,
        kept_count=response.kept_count,
        rejected_uri=response.rejected_ref.uri,
        candidates=response.candidates,
        funnel={step.rule: step.removed for step in response.funnel},
        curation_threshold=round(threshold, 6),
        selection=selection,
        **record,
    )
