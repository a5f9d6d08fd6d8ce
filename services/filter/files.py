"""`reinstruct filter`: the filter on a user's own files, no Ray needed.

Records need an `instruction` field (Alpaca rows and Self-Instruct seed records both work). Kept rows
are written in input order, unchanged except that a seed-format record keeps only the instances that
survived cleaning; rejected rows get a `_reinstruct` field with the reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..common.atomic import write_text_atomic
from ..common.config import FilterConfig
from ..common.formats import DataFormatError, _iter_rows, load_tasks
from ..common.records import Instance, TaskRecord
from .service import FilterResult, filter_tasks


def _to_task(path: Path, line: int, row: dict) -> tuple[TaskRecord, bool]:
    """(task, has_outputs)."""
    if not isinstance(row, dict):
        raise DataFormatError(path, line, None, "expected a JSON object")
    instruction = row.get("instruction")
    if not isinstance(instruction, str):  # an empty one is a record to reject, not a broken file
        raise DataFormatError(path, line, "instruction", "missing or not a string")
    if isinstance(row.get("instances"), list):
        instances = [
            Instance(str(i.get("input") or ""), str(i.get("output") or ""))
            for i in row["instances"]
            if isinstance(i, dict)
        ]
        return TaskRecord(id=f"{line}", instruction=instruction, instances=instances), True
    if "output" in row:
        return TaskRecord(
            id=f"{line}",
            instruction=instruction,
            instances=[Instance(str(row.get("input") or ""), str(row.get("output") or ""))],
        ), True
    return TaskRecord(id=f"{line}", instruction=instruction), False


def load_rows(path: Path) -> list[tuple[dict, TaskRecord, bool]]:
    return [(row, *_to_task(path, line, row)) for line, row in _iter_rows(path)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _with_instances(row: dict, kept: TaskRecord) -> dict:
    """A kept seed-format record shows only the instances that survived cleaning; other rows are
    written unchanged."""
    if not isinstance(row.get("instances"), list):
        return row
    return {**row, "instances": [{"input": i.input, "output": i.output} for i in kept.instances]}


def filter_file(
    input_path: Path,
    output_path: Path,
    pool_path: Path | None,
    cfg: FilterConfig,
    rejected_path: Path | None = None,
    on_progress=None,
    eval_path: Path | None = None,
) -> FilterResult:
    rows = load_rows(input_path)
    pool = [task for _, task, _ in load_rows(pool_path)] if pool_path else []
    eval_tasks = load_tasks(eval_path) if eval_path else None
    result = filter_tasks(
        [task for _, task, _ in rows],
        pool,
        cfg,
        eval_tasks,
        check_instances=all(has_outputs for _, _, has_outputs in rows),
        on_progress=on_progress,
    )
    kept_rows, rejected_rows = [], []
    kept_by_id = {t.id: t for t in result.kept}
    for (row, _, _), verdict in zip(rows, result.verdicts):
        if verdict.kept:
            kept_rows.append(_with_instances(row, kept_by_id[verdict.task_id]))
        else:
            rejected_rows.append(
                {
                    **row,
                    "_reinstruct": {
                        "reasons": verdict.reasons,
                        "max_rouge_l": verdict.max_rouge_l,
                        "nearest": verdict.nearest_instruction,
                    },
                }
            )
    _write_jsonl(output_path, kept_rows)
    if rejected_path:
        _write_jsonl(rejected_path, rejected_rows)
    return result
