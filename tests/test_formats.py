import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.common.formats import (
    DataFormatError,
    export_alpaca_jsonl,
    export_chat_parquet,
    load_seed_tasks,
    load_tasks,
)


def test_builtin_seed_set():
    tasks = load_seed_tasks()
    assert len(tasks) >= 100
    share = sum(t.is_classification for t in tasks) / len(tasks)
    assert 0.2 <= share <= 0.3
    assert len({t.instruction for t in tasks}) == len(tasks)
    assert all(t.instances and t.instances[0].output for t in tasks)


def test_self_instruct_original_seeds(shared_seeds):
    tasks = load_tasks(shared_seeds)
    assert len(tasks) == 175
    assert tasks[0].id == "seed_task_0"
    assert sum(t.is_classification for t in tasks) > 0
    assert all(t.lineage.stage == "seed" for t in tasks)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_alpaca_dolly_chat(tmp_path):
    alpaca = load_tasks(_write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}]))
    assert (alpaca[0].instruction, alpaca[0].instances[0].input, alpaca[0].instances[0].output) == ("Add", "1 2", "3")
    dolly = load_tasks(
        _write_jsonl(
            tmp_path / "d.jsonl",
            [{"instruction": "Is it red?", "context": "apple", "response": "yes", "category": "classification"}],
        )
    )
    assert dolly[0].is_classification and dolly[0].instances[0].input == "apple"
    sharegpt = load_tasks(
        _write_jsonl(
            tmp_path / "s.jsonl",
            [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}],
        )
    )
    assert (sharegpt[0].instruction, sharegpt[0].instances[0].output) == ("Hi?", "Hello.")
    openai = tmp_path / "o.json"
    openai.write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "system", "content": "Be kind."},
                        {"role": "user", "content": "Q"},
                        {"role": "assistant", "content": "A"},
                    ]
                }
            ]
        )
    )
    assert load_tasks(openai)[0].instances[0].output == "A"
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "X y z", "input": "", "output": "w"}]), parquet)
    assert load_tasks(parquet)[0].instruction == "X y z"


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [{"instruction": "ok", "output": "x"}, {"instruction": 5, "output": "y"}],
            r"bad.jsonl:2: field 'instruction'",
        ),
        (
            [{"instruction": "A", "instances": [{"input": "", "output": 3}], "is_classification": False}],
            r"bad.jsonl:1: field 'output'",
        ),
        ([{"instruction": "A", "instances": [], "is_classification": False}], r"bad.jsonl:1: field 'instances'"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], r"bad.jsonl:1: field 'messages\[0\].role'"),
        ([{"foo": 1}], r"bad.jsonl:1: unknown layout"),
    ],
)
def test_malformed_names_file_line_field(tmp_path, rows, match):
    with pytest.raises(DataFormatError, match=match):
        load_tasks(_write_jsonl(tmp_path / "bad.jsonl", rows))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    with pytest.raises(DataFormatError, match="bad.jsonl:2: invalid JSON"):
        load_tasks(path)


def test_exporters(tmp_path):
    tasks = load_seed_tasks()[:5]
    n = export_alpaca_jsonl(tasks, tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert n == len(rows) == sum(len(t.instances) for t in tasks)
    assert set(rows[0]) == {"instruction", "input", "output"}
    assert load_tasks(tmp_path / "out.jsonl")[0].instruction == tasks[0].instruction
    export_chat_parquet(tasks, tmp_path / "chat.parquet")
    table = pq.read_table(tmp_path / "chat.parquet").to_pylist()
    assert table[0]["messages"][0]["role"] == "user" and table[0]["messages"][1]["role"] == "assistant"
    assert load_tasks(tmp_path / "chat.parquet")[0].instances[0].output == tasks[0].instances[0].output


def test_chat_parquet_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    export_chat_parquet(load_seed_tasks()[:3], tmp_path / "chat.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "chat.parquet"), split="train")
    assert ds[0]["messages"][1]["role"] == "assistant"


def test_a_task_survives_the_proto_round_trip():
    """Every field of a record, raw format and lineage included, comes back from the wire unchanged
    (inline tasks of format 'raw' once lost it and became instruction tasks)."""
    from services.common.convert import task_from_proto, task_to_proto
    from services.common.records import FilterVerdict, Instance, Lineage, TaskRecord

    task = TaskRecord(
        id="t1",
        instruction="Continue the text.",
        name="continue",
        is_classification=True,
        instances=[Instance("in", "out"), Instance("", "only output")],
        lineage=Lineage(
            run_id="r",
            round=3,
            stage="backtranslate",
            model="m",
            prompt_template="p/v2",
            context_task_ids=["a", "b"],
            scores={"curation": 5.0},
            verdicts=["curated_by:m"],
            parent_id="seg-1",
            filter=FilterVerdict(False, ["rouge_l_too_similar", "empty_output"], 0.75, "Continue it."),
        ),
        format="raw",
    )
    assert task_from_proto(task_to_proto(task)) == task
    unfiltered = replace(task, lineage=replace(task.lineage, filter=None))
    assert task_from_proto(task_to_proto(unfiltered)).lineage.filter is None  # unset stays unset
    assert task_from_proto(task_to_proto(TaskRecord(id="x", instruction="y"))).format == "instruction"
