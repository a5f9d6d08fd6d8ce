import random

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.records import Instance, TaskRecord
from services.generator import self_instruct as si
from services.generator.bootstrap import build_meta_tasks


def _tasks(prefix, n, clf=False):
    return [
        TaskRecord(
            id=f"{prefix}{i}",
            instruction=f"{prefix} instruction number {i}:",
            is_classification=clf,
            instances=[Instance(f"in {i}", f"out {i}")],
        )
        for i in range(n)
    ]


def test_instruction_prompt_layout_exact():
    human, machine = _tasks("human", 10), _tasks("machine", 5)
    prompt = si.build_instruction_prompt(human, machine, random.Random(0))
    lines = prompt.text.split("\n")
    assert lines[0] == "Come up with a series of tasks:"
    assert [line.split(". ", 1)[0] for line in lines[1:9]] == [str(i) for i in range(1, 9)]
    assert lines[9] == "9."
    assert not any(line.endswith(":") for line in lines[1:9])  # trailing colons stripped as in the reference
    assert sum(i.startswith("machine") for i in prompt.context_task_ids) == 2
    assert sum(i.startswith("human") for i in prompt.context_task_ids) == 6
    assert prompt.template_id == "self_instruct.instructions@1"


def test_human_fills_in_while_pool_is_small():
    prompt = si.build_instruction_prompt(_tasks("human", 10), [], random.Random(0))
    assert len(prompt.context_task_ids) == 8


def test_parse_instructions_and_truncation():
    completion = " Write a poem about rain.\n10. Translate the sentence to German.\n11. List three"
    assert si.parse_instructions(completion, "stop") == [
        "Write a poem about rain.",
        "Translate the sentence to German.",
        "List three",
    ]
    assert si.parse_instructions(completion, "length") == [
        "Write a poem about rain.",
        "Translate the sentence to German.",
    ]
    assert si.parse_instructions("", "stop") == []
    assert si.parse_instructions(" One task.\n\n10. after a blank line", "stop") == ["One task."]


def test_classification_answer():
    assert si.parse_is_classification(" Yes")
    assert si.parse_is_classification("yes, it is")
    assert not si.parse_is_classification(" No")
    assert not si.parse_is_classification("")
    assert not si.parse_is_classification("???")


def test_instance_prompts_and_parsers():
    demo = TaskRecord(
        id="d", instruction="Is it spam?", is_classification=True, instances=[Instance("Buy now", "spam")]
    )
    text, template_id = si.build_instance_prompt("Is the review positive?", True, [demo])
    assert template_id == "self_instruct.instances_output_first@1"
    assert "Task: Is it spam?\nClass label: spam\nInput: Buy now\n\nTask: Is the review positive?\n" in text
    assert si.parse_output_first(
        "Class label: positive\nInput: Great!\nClass label: negative\nInput: Bad.", "stop"
    ) == [("Great!", "positive"), ("Bad.", "negative")]
    assert si.parse_input_first("Example 1\nInput: 2 2\nOutput: 4\nExample 2\nInput: 1 1\nOutput: 2", "stop") == [
        ("2 2", "4"),
        ("1 1", "2"),
    ]
    assert si.parse_input_first("Output: just this", "stop") == [("", "just this")]
    assert si.parse_input_first("Example 1\nInput: a\nOutput: b\nExample 2\nInput: c\nOut", "length") == [("a", "b")]


_messy = st.lists(
    st.sampled_from(
        list("abc 12.:\n")
        + ["Example", "Input:", "Output:", "Class label:", "Task:", "10.", "\n\n", "Yes", "No", "é", "中"]
    ),
    max_size=60,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_messy, st.sampled_from(["stop", "length"]))
def test_parsers_never_raise(text, finish):
    for parse in (si.parse_instructions, si.parse_input_first, si.parse_output_first):
        items = parse(text, finish)
        assert isinstance(items, list)
    assert all(isinstance(i, str) and i for i in si.parse_instructions(text, finish))
    assert all(out.strip() for _, out in si.parse_input_first(text, finish))
    si.parse_is_classification(text)


def test_meta_tasks_teach_the_prompt_layouts():
    human = _tasks("human", 12) + _tasks("clf", 4, clf=True)
    meta = build_meta_tasks(human, [], seed=0)
    assert all(t.format == "raw" for t in meta)
    instruction_meta = [t for t in meta if t.id.startswith("meta-instructions")]
    assert instruction_meta and instruction_meta[0].instruction.endswith("\n9.")
    completion = instruction_meta[0].instances[0].output
    assert si.parse_instructions(completion, "stop")  # what we teach is what we can parse
    classify = {t.id: t.instances[0].output for t in meta if t.id.startswith("meta-classify")}
    assert classify["meta-classify-clf0"] == " Yes" and classify["meta-classify-human0"] == " No"


def test_classification_only_variant():
    human = _tasks("human", 10) + _tasks("clf", 8, clf=True)
    prompt = si.build_instruction_prompt(
        [t for t in human if t.is_classification], [], random.Random(0), classification_only=True
    )
    assert prompt.text.startswith(
        "Come up with a series of classification tasks. Try to specify the possible output labels when possible.\n1. "
    )
    assert all(i.startswith("clf") for i in prompt.context_task_ids)
    assert prompt.template_id == "self_instruct.classification_instructions@1"
