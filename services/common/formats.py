"""Loaders for the data layouts users already have, and exporters to the ones tools read.

Layouts in: Self-Instruct seed tasks (id, name, instruction, instances[{input, output}],
is_classification), Alpaca (instruction, input, output), Dolly (instruction, context, response,
category), chat (ShareGPT `conversations` [{from, value}], OpenAI `messages` [{role, content}]); files
in JSON (a list), JSONL or Parquet. Every problem is a DataFormatError naming file, line and field.
Out: Alpaca JSONL, and chat-messages Parquet that `datasets.load_dataset("parquet", ...)` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_atomic, write_text_atomic
from .records import Instance, Lineage, TaskRecord, stable_id


class DataFormatError(ValueError):
    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        where = f"{path}" + (f":{line}" if line is not None else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = str(path), line, field


def _iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number or row index + 1, row) for JSONL, JSON lists and Parquet."""
    if not path.exists():
        raise DataFormatError(path, None, None, "no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, exc.lineno, None, f"invalid JSON: {exc.msg}") from None
        if not isinstance(data, list):
            raise DataFormatError(path, 1, None, "a JSON file must hold a list of records")
        for i, row in enumerate(data, start=1):
            yield i, row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, number, None, f"invalid JSON: {exc.msg}") from None


def _text(path: Path, line: int, row: dict, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise DataFormatError(path, line, field, "missing")
        return ""
    if not isinstance(value, str):
        raise DataFormatError(path, line, field, f"expected a string, got {type(value).__name__}")
    return value


def _seed_task(path: Path, line: int, row: dict) -> TaskRecord:
    instruction = _text(path, line, row, "instruction")
    if not instruction.strip():
        raise DataFormatError(path, line, "instruction", "empty")
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise DataFormatError(path, line, "instances", "expected a non-empty list of {input, output}")
    parsed = []
    for j, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise DataFormatError(path, line, f"instances[{j}]", "expected an object with input and output")
        parsed.append(Instance(_text(path, line, inst, "input", False), _text(path, line, inst, "output")))
    flag = row.get("is_classification", False)
    if not isinstance(flag, bool):
        raise DataFormatError(path, line, "is_classification", "expected true or false")
    task_id = row.get("id") or stable_id(path.name, line)
    return TaskRecord(
        id=str(task_id),
        name=str(row.get("name") or ""),
        instruction=instruction,
        is_classification=flag,
        instances=parsed,
        lineage=Lineage(stage="seed", model="human"),
    )


def _alpaca(path: Path, line: int, row: dict) -> TaskRecord:
    instruction = _text(path, line, row, "instruction")
    if not instruction.strip():
        raise DataFormatError(path, line, "instruction", "empty")
    inst = Instance(_text(path, line, row, "input", False), _text(path, line, row, "output"))
    return TaskRecord(
        id=str(row.get("id") or stable_id(path.name, line)),
        instruction=instruction,
        instances=[inst],
        lineage=Lineage(stage="import", model="human"),
    )


def _dolly(path: Path, line: int, row: dict) -> TaskRecord:
    instruction = _text(path, line, row, "instruction")
    inst = Instance(_text(path, line, row, "context", False), _text(path, line, row, "response"))
    category = row.get("category") or ""
    return TaskRecord(
        id=str(row.get("id") or stable_id(path.name, line)),
        instruction=instruction,
        name=str(category),
        is_classification=category == "classification",
        instances=[inst],
        lineage=Lineage(stage="import", model="human"),
    )


_ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


def _chat(path: Path, line: int, row: dict) -> TaskRecord:
    """The first user turn becomes the instruction and the assistant turn after it the output."""
    field = "messages" if "messages" in row else "conversations"
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(path, line, field, "expected a non-empty list of turns")
    normalized = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataFormatError(path, line, f"{field}[{j}]", "expected an object")
        role_key, text_key = ("role", "content") if field == "messages" else ("from", "value")
        role = _ROLE_NAMES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise DataFormatError(path, line, f"{field}[{j}].{role_key}", f"unknown role {turn.get(role_key)!r}")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise DataFormatError(path, line, f"{field}[{j}].{text_key}", "expected a string")
        normalized.append((role, content))
    users = [j for j, (role, _) in enumerate(normalized) if role == "user"]
    if not users or users[0] + 1 >= len(normalized) or normalized[users[0] + 1][0] != "assistant":
        raise DataFormatError(path, line, field, "needs a user turn followed by an assistant turn")
    j = users[0]
    return TaskRecord(
        id=str(row.get("id") or stable_id(path.name, line)),
        instruction=normalized[j][1],
        instances=[Instance("", normalized[j + 1][1])],
        lineage=Lineage(stage="import", model="human"),
    )


def _prompt_only(path: Path, line: int, row: dict) -> TaskRecord:
    """Prompts without references (evaluation by a judge only)."""
    field = "instruction" if "instruction" in row else "prompt"
    instruction = _text(path, line, row, field)
    if not instruction.strip():
        raise DataFormatError(path, line, field, "empty")
    return TaskRecord(
        id=str(row.get("id") or stable_id(path.name, line)),
        instruction=instruction,
        instances=[Instance(_text(path, line, row, "input", False), "")],
        lineage=Lineage(stage="import", model="human"),
    )


def detect_layout(row: dict) -> str:
    if "instances" in row:
        return "self_instruct"
    if "messages" in row or "conversations" in row:
        return "chat"
    if "response" in row and "instruction" in row:
        return "dolly"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "instruction" in row or "prompt" in row:
        return "prompts"
    return "unknown"


_PARSERS = {"self_instruct": _seed_task, "alpaca": _alpaca, "dolly": _dolly, "chat": _chat, "prompts": _prompt_only}


def load_tasks(path: str | Path, layout: str = "auto") -> list[TaskRecord]:
    """Loads any supported layout; 'auto' decides per file from its first record."""
    path = Path(path)
    tasks: list[TaskRecord] = []
    chosen = None if layout == "auto" else layout
    for line, row in _iter_rows(path):
        if not isinstance(row, dict):
            raise DataFormatError(path, line, None, "expected a JSON object")
        if chosen is None:
            chosen = detect_layout(row)
            if chosen == "unknown":
                raise DataFormatError(
                    path,
                    line,
                    None,
                    "unknown layout: expected instances (Self-Instruct), "
                    "instruction/output (Alpaca), instruction/response (Dolly) or messages",
                )
        if chosen not in _PARSERS:
            raise DataFormatError(path, line, None, f"unknown layout {chosen!r}")
        tasks.append(_PARSERS[chosen](path, line, row))
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataFormatError(path, None, "id", f"duplicate task id {dup!r}")
    return tasks


def builtin_seed_path() -> Path:
    return Path(str(resources.files("services.common") / "data" / "seed_tasks.jsonl"))


def load_seed_tasks(path: str | Path | None = None) -> list[TaskRecord]:
    """The user's seed tasks, or the built-in set that ships with reinstruct."""
    return load_tasks(path if path is not None else builtin_seed_path(), layout="auto")


def export_alpaca_jsonl(tasks: list[TaskRecord], path: str | Path) -> int:
    """One line per instance: {instruction, input, output}. Written atomically."""
    rows = [
        {"instruction": t.instruction, "input": inst.input, "output": inst.output}
        for t in tasks
        for inst in t.instances
    ]
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)


def export_chat_parquet(tasks: list[TaskRecord], path: str | Path) -> int:
    """One row per instance: {messages: [{role: user, content}, {role: assistant, content}]}."""
    rows = []
    for t in tasks:
        for number, inst in enumerate(t.instances):
            prompt = t.instruction if not inst.input.strip() else f"{t.instruction}\n\n{inst.input}"
            rows.append(
                {
                    # a row is one instance: a task with several keeps its id, numbered, so rows stay unique
                    "id": t.id if len(t.instances) == 1 else f"{t.id}/{number}",
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": inst.output}],
                }
            )
    write_atomic(path, lambda handle: pq.write_table(pa.Table.from_pylist(rows), handle))
    return len(rows)
