"""The filter's logic, callable without Ray: candidates in order, verdicts and a funnel out.

Rules run in this order and the first that fires is the recorded reason: Self-Instruct's instruction
rules, instance cleaning (a task left with no instance is rejected for the rule that removed most of
them), the self-curation score, decontamination, ROUGE-L novelty against the pool (kept candidates
join it), near-duplicate instances against the pool and the kept candidates (MinHash).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from ..common import deadline
from ..common.config import FilterConfig
from ..common.records import FilterVerdict, TaskRecord
from ..common.rouge import NoveltyIndex
from ..generator.self_instruct import demonstration_ids
from .decontamination import ContaminationIndex
from .near_duplicates import ResponseDeduper, instances_text
from .rules import clean_instances, instruction_rejection, sample_instances


@dataclass
class Verdict:
    task_id: str
    kept: bool
    reasons: list[str] = field(default_factory=list)
    max_rouge_l: float = 0.0
    nearest_instruction: str = ""


@dataclass
class FilterResult:
    kept: list[TaskRecord]
    rejected: list[TaskRecord]
    verdicts: list[Verdict]
    funnel: dict[str, int]


@dataclass(frozen=True)
class PoolScore:
    """A candidate's max ROUGE-L F against the pool and the pool text giving it ("" : none)."""

    max_rouge_l: float
    nearest_instruction: str


def novelty_scores(candidates: list[TaskRecord], pool: list[TaskRecord] | NoveltyIndex) -> list[PoolScore]:
    """The filter's parallel part: each candidate against the pool alone, independent of the others,
    so shards of candidates can be scored on different replicas. pool: tasks, or an index of them
    (a replica keeps the index of a pool file for the stage's next shard)."""
    index = pool if isinstance(pool, NoveltyIndex) else NoveltyIndex([t.instruction for t in pool])
    out = []
    for task in candidates:
        deadline.check()  # per candidate: one can be long
        score, nearest = index.nearest(task.instruction)
        out.append(PoolScore(score, index.texts[nearest] if nearest >= 0 else ""))
    return out


def filter_tasks(
    candidates: list[TaskRecord],
    pool: list[TaskRecord],
    cfg: FilterConfig,
    eval_tasks: list[TaskRecord] | None = None,
    *,
    check_instances: bool = True,
    index: NoveltyIndex | None = None,
    on_progress=None,
    pool_scores: list[PoolScore] | None = None,
) -> FilterResult:
    """cfg: the filter section, as the request carried it; check_instances: False for instruction-only
    candidates (no instance rules, no response dedup). pool: the tasks kept before (seeds, earlier
    rounds): ROUGE-L novelty, near-duplicate instances and the demonstrations a candidate's instance
    prompt showed are looked up there.
    index: a NoveltyIndex already holding the pool (it grows with the kept candidates);
    on_progress: called after each candidate (progress bars); pool_scores: novelty_scores(candidates,
    pool) computed elsewhere, so only the sequential part of ROUGE-L runs here (each candidate against
    those kept before it); the pool, when also given, still serves the other two. The max over pool
    and kept is the max of the two maxima, and pool entries come first on ties, so the decisions,
    scores and nearest texts are the same either way."""
    if pool_scores is not None:
        if len(pool_scores) != len(candidates):
            raise ValueError(f"pool_scores: {len(pool_scores)} scores for {len(candidates)} candidates")
        index = NoveltyIndex()  # the kept candidates only
    index = index if index is not None else NoveltyIndex([t.instruction for t in pool])
    contamination = ContaminationIndex(eval_tasks or [], cfg.decontamination_ngram)
    deduper = (
        ResponseDeduper(cfg.near_duplicate_threshold, cfg.near_duplicate_min_tokens)
        if cfg.near_duplicate_threshold > 0 and check_instances
        else None
    )
    if deduper is not None:
        for position, known in enumerate(pool):
            if position % 256 == 0:
                deadline.check()
            deduper.add(known.id, instances_text(known.instances))
    pool_by_id = {known.id: known for known in pool}
    funnel: Counter[str] = Counter()
    kept, rejected, verdicts = [], [], []
    for position, task in enumerate(candidates):
        deadline.check()  # per candidate: a quadratic batch nobody waits for any more stops at once
        reason = (
            instruction_rejection(task.instruction, cfg.min_instruction_words, cfg.max_instruction_words)
            if cfg.instruction_rules
            else ("empty_instruction" if not task.instruction.strip() else None)
        )
        instances, instance_reasons = (
            clean_instances(
                task.instances,
                instruction=task.instruction,
                shown=[i for t in demonstration_ids(task) if t in pool_by_id for i in pool_by_id[t].instances],
                classification=task.is_classification,
            )
            if check_instances
            else (task.instances, [])
        )
        if check_instances:
            instances = sample_instances(instances, cfg.max_instances_per_task, task.id)
        score, nearest_text = 0.0, ""
        response = instances_text(instances)
        if reason is None and check_instances and not instances:
            # named for what removed them, so the round's funnel says which instance rule bites
            reason = Counter(instance_reasons).most_common(1)[0][0] if instance_reasons else "no_valid_instances"
        if reason is None and task.lineage.scores.get("curation", float("inf")) < cfg.min_curation_score:
            reason = "low_curation_score"
        if reason is None and contamination and contamination.contaminated(replace(task, instances=instances)):
            reason = "contaminated"
        if reason is None:
            score, nearest = index.nearest(task.instruction)
            nearest_text = index.texts[nearest] if nearest >= 0 else ""
            if pool_scores is not None and pool_scores[position].max_rouge_l >= score:
                score, nearest_text = pool_scores[position].max_rouge_l, pool_scores[position].nearest_instruction
            too_similar = (
                score > cfg.rouge_l_threshold if cfg.reject_only_above_threshold else score >= cfg.rouge_l_threshold
            )
            if too_similar:
                reason = "rouge_l_too_similar"
        if reason is None and deduper is not None and deduper.find(response) is not None:
            reason = "near_duplicate_response"
        if reason is None:
            index.add(task.instruction)
            if deduper is not None:
                deduper.add(task.id, response)
        verdict = Verdict(
            task.id,
            reason is None,
            ([reason] if reason else []) + instance_reasons,
            score,
            nearest_text,
        )
        lineage = replace(
            task.lineage,
            filter=FilterVerdict(verdict.kept, list(verdict.reasons), score, nearest_text),
        )
        record = replace(task, instances=instances if reason is None else task.instances, lineage=lineage)
        if reason is None:
            kept.append(record)
        else:
            funnel[reason.split(":")[0]] += 1
            rejected.append(record)
        verdicts.append(verdict)
        if on_progress is not None:
            on_progress()
    return FilterResult(kept, rejected, verdicts, dict(funnel))
