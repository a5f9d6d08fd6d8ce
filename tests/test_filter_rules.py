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


def test_boundary_rule_both_ways():
    pool = [_task(0, "alpha beta gamma delta epsilon zeta eta theta")]       # 8 tokens
    tie = _task(1, "alpha beta gamma delta epsilon zeta eta iota kappa lambda mu nu")  # 12 tokens, LCS 7
    paper = filter_tasks([tie], pool, FilterSettings(near_duplicate_threshold=None))
    assert paper.verdicts[0].max_rouge_l == 0.7000000000000001 and not paper.verdicts[0].kept
    exactly = _task(2, "a b c d e f g h i j")
    at_07 = _task(3, "a b c d e f g x y z")  # LCS 7 of 10 and 10: F = 0.7 exactly
    strict = filter_tasks([at_07], [exactly], FilterSettings(near_duplicate_threshold=None, min_instruction_words=1))
    lenient = filter_tasks([at_07], [exactly], FilterSettings(near_duplicate_threshold=None, min_instruction_words=1,
                                                              reject_only_above_threshold=True))
    assert strict.verdicts[0].max_rouge_l == 0.7
    assert (strict.verdicts[0].kept, lenient.verdicts[0].kept) == (False, True)


def test_near_duplicate_responses():
    text = "The quick brown fox jumps over the lazy dog near the river bank every single morning before sunrise."
    candidates = [
        _task(1, "Describe what the fox does every morning.", [Instance("", text)]),
        _task(2, "Tell me about the habits of a certain animal.", [Instance("", text + " Indeed")]),
        _task(3, "Give an unrelated answer to a new question.", [Instance("", "Completely different words here.")]),
    ]
    result = filter_tasks(candidates, [], FilterSettings())
    assert [v.kept for v in result.verdicts] == [True, False, True]
    assert result.funnel == {"near_duplicate_response": 1}
    off = filter_tasks(candidates, [], FilterSettings(near_duplicate_threshold=None))
    assert all(v.kept for v in off.verdicts)


def test_decontamination_against_eval_set():
    passage = "the committee approved the new budget for public libraries after a long debate on tuesday evening"
    eval_task = TaskRecord(id="e", instruction="Summarize the passage.", instances=[Instance(passage, "Budget ok.")])
    leaked = _task(1, "Write a headline for this news item.", [Instance(passage.upper(), "Libraries win")])
    clean = _task(2, "Write a headline for a sports result.", [Instance("the home team won three to one", "Win")])
    result = filter_tasks([leaked, clean], [], FilterSettings(), eval_tasks=[eval_task])
    assert [v.kept for v in result.verdicts] == [False, True]
    assert result.funnel == {"contaminated": 1}


def test_curation_score_threshold():
    low = _task(1, "Explain how rainbows are formed in the sky.")
    low.lineage.scores["curation"] = 3.0
    high = _task(2, "List five animals that live in the desert.")
    high.lineage.scores["curation"] = 5.0
    unscored = _task(3, "Give a synonym for the word happy please.")
    result = filter_tasks([low, high, unscored], [], FilterSettings(min_curation_score=4.0, near_duplicate_threshold=None))
    assert [v.kept for v in result.verdicts] == [False, True, True]
    assert result.funnel == {"low_curation_score": 1}
