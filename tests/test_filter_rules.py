import pytest

from services.common.records import Instance, TaskRecord
from services.filter.rules import clean_instances, instruction_rejection
from services.filter.service import FilterSettings, filter_tasks


@pytest.mark.parametrize("text, reason", [
    ("Too short here", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Describe the image of a cat in detail.", "blacklisted:image"),
    ("Plot the sales numbers for each month.", "blacklisted:plot"),
    ("Please go to the website and summarize it.", "blacklisted:go to"),
    ("Write a program that sorts a list.", "write_a_program"),
    ("- List three fruits that are red.", "starts_with_punctuation"),
    ("Élaborez une liste de trois fruits rouges.", "starts_with_non_ascii"),
])
def test_instruction_rules(text, reason):
    assert instruction_rejection(text) == reason


@pytest.mark.parametrize("text", [
    "Describe the imagery in the poem below.",  # 'image' only as a whole word
    "List four mapping techniques used in biology.",
    "Write a short programme for the school concert.",
    " ".join(["word"] * 150),
    "Name four red fruits.",
])
def test_instruction_rules_keep(text):
    assert instruction_rejection(text) is None


def test_clean_instances():
    kept, reasons = clean_instances([
        Instance("a", "1"), Instance("a", "1"), Instance("b", "2"), Instance("b", "3"), Instance("c", ""),
        Instance("echo", "echo"), Instance("d", "4"),
    ])
    assert [(k.input, k.output) for k in kept] == [("a", "1"), ("d", "4")]
    assert sorted(reasons) == sorted(["duplicate_instance", "same_input_different_output",
                                      "same_input_different_output", "empty_output", "output_repeats_input"])


def _task(i, text, instances=None):
    return TaskRecord(id=f"c{i}", instruction=text, instances=instances or [Instance("", "an output")])


def test_filter_in_order_with_funnel():
    pool = [_task(0, "Write a short poem about the sea.")]
    candidates = [
        _task(1, "Write a short poem about the ocean."),          # too similar to pool
        _task(2, "Summarize the article in two sentences."),      # kept
        _task(3, "Summarize the article in two short sentences."),  # similar to candidate 2, kept earlier
        _task(4, "Draw a picture of a horse."),                   # blacklist
        _task(5, "Translate the sentence into Spanish.", [Instance("x", "")]),  # no valid instances
    ]
    result = filter_tasks(candidates, pool, FilterSettings())
    assert [v.kept for v in result.verdicts] == [False, True, False, False, False]
    assert result.funnel == {"rouge_l_too_similar": 2, "blacklisted": 1, "no_valid_instances": 1}
    assert result.verdicts[2].nearest_instruction == "Summarize the article in two sentences."
    assert result.kept[0].lineage.verdicts[-1] == "kept"
    assert result.rejected[0].lineage.verdicts[-1] == "rejected:rouge_l_too_similar"
    assert result.kept[0].lineage.scores["max_rouge_l"] < 0.7
