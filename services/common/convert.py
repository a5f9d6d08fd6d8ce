"""proto <-> domain records. The only place that knows both shapes."""

from __future__ import annotations

from ..api import common_pb2
from .records import FilterVerdict, Instance, Lineage, TaskRecord


def _verdict_to_proto(verdict: FilterVerdict | None) -> common_pb2.FilterVerdict | None:
    if verdict is None:
        return None
    return common_pb2.FilterVerdict(
        kept=verdict.kept,
        reasons=verdict.reasons,
        max_rouge_l=verdict.max_rouge_l,
        nearest_instruction=verdict.nearest_instruction,
    )


def _verdict_from_proto(lineage: common_pb2.Lineage) -> FilterVerdict | None:
    if not lineage.HasField("filter"):
        return None
    verdict = lineage.filter
    return FilterVerdict(verdict.kept, list(verdict.reasons), verdict.max_rouge_l, verdict.nearest_instruction)


def task_to_proto(task: TaskRecord) -> common_pb2.Task:
    lineage = task.lineage
    return common_pb2.Task(
        id=task.id,
        name=task.name,
        instruction=task.instruction,
        is_classification=task.is_classification,
        instances=[common_pb2.Instance(input=i.input, output=i.output) for i in task.instances],
        format=task.format,
        lineage=common_pb2.Lineage(
            run_id=lineage.run_id,
            round=lineage.round,
            stage=lineage.stage,
            model=lineage.model,
            prompt_template=lineage.prompt_template,
            context_task_ids=lineage.context_task_ids,
            scores=lineage.scores,
            verdicts=lineage.verdicts,
            parent_id=lineage.parent_id,
            filter=_verdict_to_proto(lineage.filter),
        ),
    )


def task_from_proto(message: common_pb2.Task) -> TaskRecord:
    lineage = message.lineage
    return TaskRecord(
        id=message.id,
        name=message.name,
        instruction=message.instruction,
        is_classification=message.is_classification,
        instances=[Instance(i.input, i.output) for i in message.instances],
        format=message.format or "instruction",
        lineage=Lineage(
            run_id=lineage.run_id,
            round=lineage.round,
            stage=lineage.stage,
            model=lineage.model,
            prompt_template=lineage.prompt_template,
            context_task_ids=list(lineage.context_task_ids),
            scores=dict(lineage.scores),
            verdicts=list(lineage.verdicts),
            parent_id=lineage.parent_id,
            filter=_verdict_from_proto(lineage),
        ),
    )


def tasks_to_source(tasks: list[TaskRecord]) -> common_pb2.TaskSource:
    return common_pb2.TaskSource(inline=common_pb2.TaskBatch(tasks=[task_to_proto(t) for t in tasks]))


def uri_source(uri: str) -> common_pb2.TaskSource:
    return common_pb2.TaskSource(uri=uri)
