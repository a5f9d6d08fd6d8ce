"""The filter's logic, callable without Ray: candidates in order, verdicts and a funnel out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from ..common.records import TaskRecord
from ..common.rouge import NoveltyIndex
from .rules import DEFAULT_BLACKLIST, clean_instances, instruction_rejection


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


@dataclass
class FilterSettings:
    rouge_l_threshold: float = 0.7
    min_instruction_words: int = 4
    max_instruction_words: int = 150
    blacklist: tuple[str, ...] = DEFAULT_BLACKLIST


def filter_tasks(candidates: list[TaskRecord], pool: list[TaskRecord], settings: FilterSettings) -> FilterResult:
    """Heuristic rules, then instance cleaning, then ROUGE-L novelty in candidate order (kept tasks
    join the pool, so two near-identical candidates in one batch cannot both pass)."""
    index = NoveltyIndex([t.instruction for t in pool])
    funnel: Counter[str] = Counter()
    kept, rejected, verdicts = [], [], []
    for task in candidates:
        reason = instruction_rejection(task.instruction, settings.min_instruction_words,
                                       settings.max_instruction_words, settings.blacklist)
        instances, instance_reasons = clean_instances(task.instances)
        score, nearest = 0.0, -1
        if reason is None and not instances:
            reason = "no_valid_instances"
        if reason is None:
            score, nearest = index.nearest(task.instruction)
            if score >= settings.rouge_l_threshold:
                reason = "rouge_l_too_similar"
            else:
                index.add(task.instruction)
        reasons = [reason] if reason else []
        verdict = Verdict(task.id, reason is None, reasons + instance_reasons, score,
                          index.texts[nearest] if nearest >= 0 else "")
        lineage = replace(task.lineage, scores={**task.lineage.scores, "max_rouge_l": score},
                          verdicts=[*task.lineage.verdicts, "kept" if reason is None else f"rejected:{reason}"])
        record = replace(task, instances=instances if reason is None else task.instances, lineage=lineage)
        if reason is None:
            kept.append(record)
        else:
            funnel[reason.split(":")[0]] += 1
            rejected.append(record)
        verdicts.append(verdict)
    return FilterResult(kept, rejected, verdicts, dict(funnel))
