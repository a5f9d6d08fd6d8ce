import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_jobs.meta_tasks import build_meta_tasks
from services.common.engines import Completion, ModelSessions, SamplingParams
from services.common.records import Instance, TaskRecord
from services.generator import self_instruct as si
from services.generator.service import GeneratorService, RunContext


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
    assert si.parse_instructions(completion, "stop", 9) == [
        "Write a poem about rain.",
        "Translate the sentence to German.",
        "List three",
    ]
    assert si.parse_instructions(completion, "length", 9) == [
        "Write a poem about rain.",
        "Translate the sentence to German.",
    ]
    assert si.parse_instructions("", "stop", 9) == []
    assert si.parse_instructions(" One task.\n\n10. after a blank line", "stop", 9) == ["One task."]


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
    for parse in (lambda t, f: si.parse_instructions(t, f, 9), si.parse_input_first, si.parse_output_first):
        items = parse(text, finish)
        assert isinstance(items, list)
    assert all(isinstance(i, str) and i for i in si.parse_instructions(text, finish, 9))
    assert all(label.strip() for _, label in si.parse_output_first(text, finish))
    assert all(out.strip() for _, out in si.parse_input_first(text, finish))
    si.parse_is_classification(text)


def test_meta_tasks_teach_the_prompt_layouts():
    human = _tasks("human", 12) + _tasks("clf", 4, clf=True)
    meta = build_meta_tasks(human, [], seed=0)
    assert all(t.format == "raw" for t in meta)
    instruction_meta = [t for t in meta if t.id.startswith("meta-instructions")]
    assert instruction_meta and instruction_meta[0].instruction.endswith("\n9.")
    completion = instruction_meta[0].instances[0].output
    assert si.parse_instructions(completion, "stop", 9)  # what we teach is what we can parse
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


# ---- the numbered list: consecutive items from the prompt's next number, up to item 15 ---------------------------

DATA = Path(__file__).parent / "data"


def _next_number(prompt: str) -> int:
    return int(re.search(r"(\d+)\.$", prompt).group(1))


def test_parser_keeps_only_the_real_items_of_real_completions():
    """Three completions by the default model (SmolLM2-135M-Instruct) to real instruction prompts ending
    in '9.': the first folds item 10's sub-list into it; item 16, which the reference's stops cut off,
    is never kept."""
    rows = [json.loads(line) for line in (DATA / "smollm2_instruction_completions.jsonl").read_text().splitlines()]
    parsed = [si.parse_instructions(r["completion"], r["finish_reason"], _next_number(r["prompt"])) for r in rows]
    assert parsed[0] == [
        "Tell the story of a person who is an example of a different species.",
        "Choose only one product from the given package that meets three criteria:\n"
        "1. It has no metal on it.\n2. It has no plastic on it.\n3. It has no other than a human body.",
        "Is a creature from another planet.",
        "The last one to be chosen must be the most expensive item in your country.",
        "Is a word with more vowels then 5 vowels.",
        "Has no more vowels than two letters.",
        "Is a poem written by a person named Jack Sparrow.",
    ]
    assert parsed[1] == [
        "Tell a story of a time when a person used humor to solve a problem.",
        "Write a song about a brave warrior who saved their country from an enemy.",
        "Create a poem that tells the story of a mythical creature with human and animal features.",
        "Provide a recipe for a dish made with only ingredients found on every continent except Antarctica.",
        "Suggest a new sport that uses only two legs.",
        "Invent a machine that can lift anything heavier than 5 tons.",
        "Design a spaceship that can travel across the galaxy in just 2 years.",
    ]
    assert parsed[2] == [
        "Write a short story about a time when you helped someone.",
        "Write a poem that uses the color red.",
        "Write a song about love and loss.",
        'Write a speech that says, "I am not happy with my life."',
    ]


def test_the_list_stops_at_the_first_break_in_its_numbering():
    text = " First task here.\n10. Second task here.\n12. Skipped a number.\n13. After the break."
    assert si.parse_instructions(text, "stop", 9) == ["First task here.", "Second task here."]
    assert si.parse_instructions(" Task A.\n6. Task B.\n7. Task C.", "stop", 5) == ["Task A.", "Task B.", "Task C."]
    assert si.parse_instructions(" Task A.\n10. Task B.", "stop", 5) == ["Task A."]  # the prompt ended with '5.'
    assert si.parse_instructions(" Task A.\n1. Not a sub-list.\n10. Task B.", "stop", 9) == ["Task A."]
    assert si.parse_instructions(" Task A.\n10 . Task B.\n11.Task C.", "stop", 9) == ["Task A.", "Task B.", "Task C."]
    assert si.parse_instructions(" Add the numbers\n10.5 and 3.\n10. Next.", "stop", 9) == [
        "Add the numbers 10.5 and 3.",  # a line starting with a decimal number continues the item
        "Next.",
    ]


def test_a_sub_list_is_folded_into_the_item_that_announces_it():
    text = " Sort these words:\n1. pear\n2. apple\n10. Name a color.\n11. Pick one option:\n12. Last task."
    assert si.parse_instructions(text, "stop", 9) == [
        "Sort these words:\n1. pear\n2. apple",
        "Name a color.",
        "Pick one option:",  # followed by the next item: its input comes with its instances
        "Last task.",
    ]
    broken = " Sort these words:\n1. pear\n3. apple\n10. Name a color."
    assert si.parse_instructions(broken, "stop", 9) == ["Sort these words:\n1. pear"]  # the sub-list breaks: stop


def test_the_list_ends_before_item_16_as_the_references_stops_make_it():
    assert si.INSTRUCTION_STOPS == ("\n\n", "\n16", "16.", "16 .")
    text = " T9.\n" + "".join(f"{n}. T{n}.\n" for n in range(10, 19))
    assert si.parse_instructions(text, "stop", 9) == [f"T{n}." for n in range(9, 16)]


def test_a_length_cut_drops_only_an_item_it_can_have_cut():
    assert si.parse_instructions(" Task A.\n10. Task B is cut", "length", 9) == ["Task A."]
    # the cut came after a break in the numbering: the last kept item was complete
    assert si.parse_instructions(" Task A.\n10. Task B.\n14. garbage that was cu", "length", 9) == [
        "Task A.",
        "Task B.",
    ]


# ---- instance demonstrations: several instances per task, one per label for classification ----------------------


def _labelled(task_id, labels, per_label=2):
    instances = [Instance(f"{label} example {n}", label) for n in range(per_label) for label in labels]
    return TaskRecord(
        id=task_id, instruction=f"Label it: {'/'.join(labels)}.", is_classification=True, instances=instances
    )


def test_a_classification_demonstration_shows_one_instance_per_label():
    demo = _labelled("d", ["positive", "negative", "neutral"])
    shown = si.demonstration_instances(demo, 4, random.Random(0))
    assert sorted(i.output for i in shown) == ["negative", "neutral", "positive"]
    assert shown == si.demonstration_instances(demo, 4, random.Random(0))  # drawn reproducibly
    many = _labelled("m", [f"label {n}" for n in range(6)], per_label=1)
    assert len({i.output for i in si.demonstration_instances(many, 4, random.Random(0))}) == 4
    one = _labelled("o", ["yes"], per_label=1)
    assert si.demonstration_instances(one, 4, random.Random(0)) == one.instances


def test_a_generation_demonstration_shows_several_instances():
    demo = TaskRecord(id="g", instruction="Add.", instances=[Instance(f"{n} {n}", str(2 * n)) for n in range(7)])
    shown = si.demonstration_instances(demo, 4, random.Random(0))
    assert len(shown) == 4 and shown == sorted(shown, key=lambda i: int(i.output))  # the seed's order
    single = TaskRecord(id="s", instruction="Add.", instances=[Instance("1 1", "2")])
    assert si.demonstration_instances(single, 4, random.Random(0)) == single.instances


class _EchoEngine(ModelSessions):
    def __init__(self, answer):
        self.model_uri, self.tokenizer, self.prompts, self.answer = None, None, [], answer

    def load(self, model_uri):
        self.model_uri = model_uri

    def generate(self, prompts, params):
        self.prompts += prompts
        return [Completion(self.answer, "stop") for _ in prompts]


def test_instance_prompts_show_every_label_of_a_classification_demonstration():
    engine = _EchoEngine("Class label: spam\nEmail: Win a prize now\nClass label: not spam\nEmail: Lunch at noon?")
    service = GeneratorService(engine)
    task = TaskRecord(id="t", instruction="Is the email spam?", is_classification=True)
    demos = [_labelled("d1", ["positive", "negative"]), _labelled("d2", ["yes", "no", "maybe"])]
    out = service.generate_instances(RunContext("r", 1), "m", [task], demos, 2, SamplingParams())
    prompt = engine.prompts[0]
    assert prompt.count("Class label: ") == 5  # 2 + 3 labels
    assert {"Class label: positive", "Class label: negative", "Class label: maybe"} <= set(prompt.split("\n"))
    assert out[0].instances == [
        Instance("Email: Win a prize now", "spam"),
        Instance("Email: Lunch at noon?", "not spam"),
    ]
    assert sorted(si.demonstration_ids(out[0])) == ["d1", "d2"]  # the filter finds what the prompt showed
    assert si.demonstration_ids(task) == []


# ---- instance parsers ---------------------------------------------------------------------------------------------


def test_output_first_keeps_the_input_whatever_its_field_is_called():
    text = "Class label: positive\nReview: great phone\nClass label: negative\nSentence: The battery died.\nsecond line"
    assert si.parse_output_first(text, "stop") == [
        ("Review: great phone", "positive"),  # the reference keeps the field name: it says what the text is
        ("Sentence: The battery died.\nsecond line", "negative"),
    ]
    assert si.parse_output_first("Class label: Yes\nThe number 7 is odd.", "stop") == [("The number 7 is odd.", "Yes")]
    assert si.parse_output_first("Class label: bug\nInput: TypeError: bad operand", "stop") == [
        ("TypeError: bad operand", "bug")  # only our layout's 'Input:' goes
    ]
    assert si.parse_output_first("Sure! Here you go.\nClass label: spam\nInput: Win!", "stop") == [("Win!", "spam")]


def test_input_first_keeps_the_input_whatever_its_field_is_called():
    assert si.parse_input_first("Example 1\nSentence: It rains.\nOutput: Il pleut.", "stop") == [
        ("Sentence: It rains.", "Il pleut.")
    ]
    assert si.parse_input_first("Example 1\nInput 1: 2 2\nOutput 1: 4", "stop") == [("2 2", "4")]


def test_input_first_cuts_an_output_at_the_next_input():
    assert si.parse_input_first("Input: a\nOutput: b\nInput: c\nOutput: d", "stop") == [("a", "b"), ("c", "d")]
    assert si.parse_input_first("Example 1\nInput: a\nOutput: b\n\nExample 2\nOutput: c", "stop") == [
        ("a", "b"),
        ("", "c"),
    ]
    assert si.parse_input_first("Input: a\nOutput: b\nInput: c\nOutput: d is cu", "length") == [("a", "b")]
    assert si.parse_input_first("Input: a\nOutput: b\nInput: c", "length") == [("a", "b")]


def test_instance_prompts_show_several_instances_of_a_generation_demonstration():
    engine = _EchoEngine("Example 1\nInput: 3 4\nOutput: 7\nExample 2\nInput: 1 1\nOutput: 2")
    demo = TaskRecord(
        id="g", instruction="Add the numbers.", instances=[Instance(f"{n} {n}", str(2 * n)) for n in range(6)]
    )
    task = TaskRecord(id="t", instruction="Add two numbers.")
    out = GeneratorService(engine).generate_instances(RunContext("r", 1), "m", [task], [demo], 1, SamplingParams())
    assert (
        "Example 2\n" in engine.prompts[0] and "Example 3\n" not in engine.prompts[0]
    )  # generation.demonstration_instances
    assert out[0].instances == [Instance("3 4", "7"), Instance("1 1", "2")]


def test_in_context_counts_left_unset_are_the_replicas_config():
    """GenerateInstructionsRequest's in-context counts: unset means the replica's generation config
    (6 human + 2 machine by default), an explicit 0 stays 0, and none at all is refused naming the field."""
    from services.api import generator_pb2
    from services.common.config import GenerationConfig
    from services.common.validation import RequestError
    from services.generator.deployment import in_context_counts

    g = GenerationConfig()
    defaults = (g.num_human_in_context, g.num_machine_in_context)
    request = generator_pb2.GenerateInstructionsRequest
    assert in_context_counts(request(), defaults) == (6, 2)
    assert in_context_counts(request(num_machine_in_context=0), defaults) == (6, 0)
    assert in_context_counts(request(num_human_in_context=3), (4, 1)) == (3, 1)
    with pytest.raises(RequestError, match="^num_human_in_context: at least one"):
        in_context_counts(request(num_human_in_context=0, num_machine_in_context=0), defaults)
    with pytest.raises(RequestError, match="^num_machine_in_context"):
        in_context_counts(request(num_machine_in_context=9), defaults)
    with pytest.raises(RequestError, match=r"^num_human_in_context: 8 \+ 2 in-context tasks; at most 8"):
        in_context_counts(request(num_human_in_context=8), defaults)  # the machine count left at its default
