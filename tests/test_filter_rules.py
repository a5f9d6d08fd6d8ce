import pytest

from services.common.config import FilterConfig
from services.common.records import Instance, TaskRecord
from services.filter.rules import clean_instances, instruction_rejection
from services.filter.service import filter_tasks


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Too short here", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Describe the image of a cat in detail.", "blacklisted:image"),
        ("Plot the sales numbers for each month.", "blacklisted:plot"),
        ("Please go to the website and summarize it.", "blacklisted:go to"),
        ("Write a program that sorts a list.", "write_a_program"),
        ("- List three fruits that are red.", "starts_with_punctuation"),
        ("Élaborez une liste de trois fruits rouges.", "starts_with_non_ascii"),
    ],
)
def test_instruction_rules(text, reason):
    assert instruction_rejection(text) == reason


@pytest.mark.parametrize(
    "text",
    [
        "Describe the imagery in the poem below.",  # 'image' only as a whole word
        "List four mapping techniques used in biology.",
        "Write a short programme for the school concert.",
        " ".join(["word"] * 150),
        "Name four red fruits.",
    ],
)
def test_instruction_rules_keep(text):
    assert instruction_rejection(text) is None


def _reference(instances: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Self-Instruct's reference rules (yizhongw/self-instruct, prepare_for_finetuning.py:
    filter_duplicate_instances, filter_invalid_instances), transcribed: (input, output) pairs."""
    for i in range(1, len(instances)):  # same non-empty input, different output: the task is dropped
        for j in range(0, i):
            if instances[i][0] == "":
                continue
            if instances[i][0] == instances[j][0] and instances[i][1] != instances[j][1]:
                return set()
    kept = set()
    for inp, out in set(instances):
        if inp == out or out == "" or inp.strip().endswith(":") or out.strip().endswith(":"):
            continue
        kept.add((inp, out))
    return kept


@pytest.mark.parametrize(
    "pairs",
    [
        [("a", "1"), ("a", "1"), ("c", ""), ("echo", "echo"), ("d", "4")],
        [("a", "1"), ("b", "2"), ("b", "3"), ("d", "4")],  # a conflict drops the whole task
        [("", "Paris"), ("", "The capital is Paris."), ("", "Lyon")],  # no input: several answers are fine
        [("Translate:", "Bonjour"), ("hello", "Output:"), ("x", "y")],  # a cut generation ends with ':'
        [("", ""), ("q", "a")],
    ],
)
def test_clean_instances_decides_as_the_reference(pairs):
    kept, reasons = clean_instances([Instance(i, o) for i, o in pairs])
    assert {(k.input, k.output) for k in kept} == _reference(pairs)
    assert len(kept) + len(reasons) == len(pairs)  # every removal has its reason


def test_clean_instances_reasons():
    _, reasons = clean_instances(
        [Instance("a", "1"), Instance("a", "1"), Instance("c", ""), Instance("e", "e"), Instance("f", "g:")]
    )
    assert sorted(reasons) == ["duplicate_instance", "empty_output", "ends_with_colon", "output_repeats_input"]
    kept, reasons = clean_instances([Instance("b", "2"), Instance("b", "3")])
    assert kept == [] and reasons == ["same_input_different_output"] * 2


def test_up_to_five_instances_kept_at_random_after_cleaning():
    from services.filter.rules import sample_instances

    instances = [Instance(str(i), f"out {i}") for i in range(9)]
    chosen = sample_instances(instances, 5, "task-1")
    assert len(chosen) == 5 and chosen == sorted(chosen, key=lambda i: int(i.input))  # original order
    assert chosen == sample_instances(instances, 5, "task-1")  # reproducible per task
    assert len({tuple(i.input for i in sample_instances(instances, 5, f"task-{n}")) for n in range(10)}) > 1  # random
    assert sample_instances(instances[:3], 5, "t") == instances[:3]


def _task(i, text, instances=None):
    return TaskRecord(id=f"c{i}", instruction=text, instances=instances or [Instance("", "an output")])


def test_filter_in_order_with_funnel():
    pool = [_task(0, "Write a short poem about the sea.")]
    candidates = [
        _task(1, "Write a short poem about the ocean."),  # too similar to pool
        _task(2, "Summarize the article in two sentences."),  # kept
        _task(3, "Summarize the article in two short sentences."),  # similar to candidate 2, kept earlier
        _task(4, "Draw a picture of a horse."),  # blacklist
        _task(5, "Translate the sentence into Spanish.", [Instance("x", "")]),  # no valid instance left
    ]
    result = filter_tasks(candidates, pool, FilterConfig())
    assert [v.kept for v in result.verdicts] == [False, True, False, False, False]
    assert result.funnel == {"rouge_l_too_similar": 2, "blacklisted": 1, "empty_output": 1}  # what emptied it
    assert result.verdicts[2].nearest_instruction == "Summarize the article in two sentences."
    kept, similar = result.kept[0].lineage.filter, result.rejected[0].lineage.filter
    assert kept.label == "kept" and kept.max_rouge_l < 0.7
    assert similar.label == "rejected:rouge_l_too_similar" and similar.reasons == ["rouge_l_too_similar"]
    assert similar.max_rouge_l >= 0.7 and similar.nearest_instruction == "Write a short poem about the sea."
    assert "max_rouge_l" not in result.kept[0].lineage.scores  # one place for it: the verdict


def test_boundary_rule_both_ways():
    pool = [_task(0, "alpha beta gamma delta epsilon zeta eta theta")]  # 8 tokens
    tie = _task(1, "alpha beta gamma delta epsilon zeta eta iota kappa lambda mu nu")  # 12 tokens, LCS 7
    paper = filter_tasks([tie], pool, FilterConfig(near_duplicate_threshold=0))
    assert paper.verdicts[0].max_rouge_l == 0.7000000000000001 and not paper.verdicts[0].kept
    exactly = _task(2, "a b c d e f g h i j")
    at_07 = _task(3, "a b c d e f g x y z")  # LCS 7 of 10 and 10: F = 0.7 exactly
    strict = filter_tasks([at_07], [exactly], FilterConfig(near_duplicate_threshold=0, min_instruction_words=1))
    lenient = filter_tasks(
        [at_07],
        [exactly],
        FilterConfig(near_duplicate_threshold=0, min_instruction_words=1, reject_only_above_threshold=True),
    )
    assert strict.verdicts[0].max_rouge_l == 0.7
    assert (strict.verdicts[0].kept, lenient.verdicts[0].kept) == (False, True)


def test_near_duplicate_responses():
    text = "The quick brown fox jumps over the lazy dog near the river bank every single morning before sunrise."
    candidates = [
        _task(1, "Describe what the fox does every morning.", [Instance("", text)]),
        _task(2, "Tell me about the habits of a certain animal.", [Instance("", text + " Indeed")]),
        _task(3, "Give an unrelated answer to a new question.", [Instance("", "Completely different words here.")]),
    ]
    result = filter_tasks(candidates, [], FilterConfig())
    assert [v.kept for v in result.verdicts] == [True, False, True]
    assert result.funnel == {"near_duplicate_response": 1}
    off = filter_tasks(candidates, [], FilterConfig(near_duplicate_threshold=0))
    assert all(v.kept for v in off.verdicts)


def test_decontamination_against_eval_set():
    passage = "the committee approved the new budget for public libraries after a long debate on tuesday evening"
    eval_task = TaskRecord(id="e", instruction="Summarize the passage.", instances=[Instance(passage, "Budget ok.")])
    leaked = _task(1, "Write a headline for this news item.", [Instance(passage.upper(), "Libraries win")])
    clean = _task(2, "Write a headline for a sports result.", [Instance("the home team won three to one", "Win")])
    result = filter_tasks([leaked, clean], [], FilterConfig(), eval_tasks=[eval_task])
    assert [v.kept for v in result.verdicts] == [False, True]
    assert result.funnel == {"contaminated": 1}


def _contaminated_by_brute_force(task, eval_tasks, n):
    """The rule spelled out: a shared n-gram with a long eval text, or a shorter one (8+ tokens) whole."""
    from services.common.rouge import tokenize
    from services.filter.decontamination import _task_text

    def grams(tokens, k):
        return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}

    texts = [tokenize(t) for e in eval_tasks for t in _task_text(e)]
    for candidate in map(tokenize, _task_text(task)):
        for tokens in texts:
            if len(tokens) >= n and grams(candidate, n) & grams(tokens, n):
                return True
            if 8 <= len(tokens) < n and tuple(tokens) in grams(candidate, len(tokens)):
                return True
    return False


def test_decontamination_finds_short_eval_texts_whole_and_agrees_with_the_rule():
    import random

    from services.filter.decontamination import ContaminationIndex

    rng = random.Random(0)
    words = "red blue green cat dog fish runs jumps over under the a one two".split()
    eval_tasks = [
        TaskRecord(
            id=f"e{i}",
            instruction=" ".join(rng.choices(words, k=rng.randint(3, 20))),
            instances=[Instance(" ".join(rng.choices(words, k=rng.randint(0, 16))), "")],
        )
        for i in range(40)
    ]
    short = "one two red cat runs over the blue dog"  # 9 tokens: below the 13-gram, copied whole counts
    eval_tasks.append(TaskRecord(id="short", instruction=short))
    index = ContaminationIndex(eval_tasks, 13)
    copied = _task(1, "Continue the text.", [Instance(f"so {short.upper()} and more", "ok")])
    assert index.contaminated(copied) and _contaminated_by_brute_force(copied, eval_tasks, 13)
    for i in range(200):
        candidate = _task(i, " ".join(rng.choices(words, k=rng.randint(4, 30))))
        assert index.contaminated(candidate) == _contaminated_by_brute_force(candidate, eval_tasks, 13), i


def test_decontamination_is_linear_and_stops_when_the_budget_ends():
    """The issue's shape: a few candidates with long inputs against many short eval texts (it once
    compared every short text at every position: 173 s). Counted, not timed: index lookups."""
    from services.common import deadline
    from services.filter import decontamination
    from services.filter.decontamination import ContaminationIndex

    eval_tasks = [
        TaskRecord(id=f"e{i}", instruction=f"alpha beta gamma delta epsilon zeta eta w{i}") for i in range(5000)
    ]
    index = ContaminationIndex(eval_tasks, 13)
    long_input = " ".join(f"word{i}" for i in range(20_000))
    candidates = [_task(i, "Summarize this.", [Instance(long_input, "ok")]) for i in range(3)]
    lookups = 0

    class Counting(dict):
        def get(self, key, default=None):
            nonlocal lookups
            lookups += 1
            return super().get(key, default)

    index._short_texts = Counting(index._short_texts)
    assert not any(index.contaminated(c) for c in candidates)
    assert lookups <= 3 * 20_010, "one lookup per position, whatever the number of short eval texts"
    with deadline.budget(1e-9):
        with pytest.raises(deadline.WorkAbandoned):
            ContaminationIndex(eval_tasks, 13)
        with pytest.raises(deadline.WorkAbandoned):
            index.contaminated(candidates[0])
    assert decontamination.SHORT_TEXT_MIN_TOKENS == 8


def test_curation_score_threshold():
    low = _task(1, "Explain how rainbows are formed in the sky.")
    low.lineage.scores["curation"] = 3.0
    high = _task(2, "List five animals that live in the desert.")
    high.lineage.scores["curation"] = 5.0
    unscored = _task(3, "Give a synonym for the word happy please.")
    result = filter_tasks([low, high, unscored], [], FilterConfig(min_curation_score=4.0, near_duplicate_threshold=0))
    assert [v.kept for v in result.verdicts] == [False, True, True]
    assert result.funnel == {"low_curation_score": 1}


def test_score_novelty_keeps_a_pool_index_until_the_pool_file_changes(tmp_path):
    from services.api import filter_pb2
    from services.common.convert import uri_source
    from services.common.store import RunStore
    from services.filter.deployment import FilterDeployment
    from tests.tiny import owned_context

    replica = FilterDeployment.func_or_class({"store": {"root": str(tmp_path)}})
    store = RunStore(str(tmp_path))
    pool_uri, candidates_uri = store.dataset_uri("r", 1, "pool"), store.dataset_uri("r", 1, "candidates")
    store.write_tasks(candidates_uri, [TaskRecord(id="c", instruction="Write a poem about the sea.")])
    request = filter_pb2.ScoreNoveltyRequest(
        context=owned_context(str(tmp_path), "r"),
        candidates=uri_source(candidates_uri),
        pool=uri_source(pool_uri),
    )
    store.write_tasks(pool_uri, [TaskRecord(id="p", instruction="Name three rivers.")])
    first = replica.ScoreNovelty(request).scores[0]
    assert first.max_rouge_l == 0.0 and replica.ScoreNovelty(request).scores[0] == first  # the kept index
    store.write_tasks(pool_uri, [TaskRecord(id="p", instruction="Write a poem about the sea.")])
    assert replica.ScoreNovelty(request).scores[0].max_rouge_l == 1.0  # a new version of the file: indexed again


def test_zero_and_false_are_answers_not_unset(tmp_path):
    """proto3 `optional`: a client can switch dedup off (0) on a replica whose config has it on, and
    ask for use_gpu=false where the config says true; an unset field takes the config's value."""
    from services.api import common_pb2, config_pb2, filter_pb2
    from services.common.convert import tasks_to_source
    from services.filter.deployment import FilterDeployment

    replica = FilterDeployment.func_or_class({"store": {"root": str(tmp_path)}})  # near_duplicate_threshold 0.9
    same = "The same long answer, word for word, long enough for its shingles to say something."
    twins = [
        TaskRecord(id=f"t{i}", instruction=f"Describe {topic} in one short paragraph.", instances=[Instance("", same)])
        for i, topic in enumerate(["the moon landing", "photosynthesis in plants"])
    ]
    ctx = common_pb2.RunContext(run_id="r", round=1)
    default = replica.FilterTasks(filter_pb2.FilterTasksRequest(context=ctx, candidates=tasks_to_source(twins)))
    off = replica.FilterTasks(
        filter_pb2.FilterTasksRequest(
            context=ctx,
            candidates=tasks_to_source(twins),
            filter=config_pb2.FilterConfig(near_duplicate_threshold=0),
        )
    )
    assert [v.kept for v in default.verdicts] == [True, False] and default.verdicts[1].reasons == [
        "near_duplicate_response"
    ]
    assert [v.kept for v in off.verdicts] == [True, True]


def test_the_drivers_filter_section_decides_not_the_replicas(tmp_path):
    """A replica deployed with stricter rules than the driver's config: the request's section decides
    (the driver's defaults), and a section the request leaves unset is the config's default, not the
    replica's."""
    from services.api import common_pb2, config_pb2, filter_pb2
    from services.common.convert import tasks_to_source
    from services.common.sections import to_message
    from services.filter.deployment import FilterDeployment

    replica = FilterDeployment.func_or_class(
        {"store": {"root": str(tmp_path)}, "filter": {"min_instruction_words": 10, "max_instances_per_task": 1}}
    )
    task = TaskRecord(
        id="t", instruction="Name three rivers of Europe.", instances=[Instance("", "Rhine"), Instance("", "Danube")]
    )
    ctx = common_pb2.RunContext(run_id="r", round=1)

    def kept(section) -> list[int]:
        request = filter_pb2.FilterTasksRequest(context=ctx, candidates=tasks_to_source([task]), filter=section)
        return [len(t.instances) for t in replica.FilterTasks(request).kept]

    assert kept(to_message(FilterConfig())) == [2]  # 5 words pass the driver's 4; both instances kept (5 max)
    assert kept(config_pb2.FilterConfig()) == [2]  # unset: the config's defaults, not the replica's 10 and 1
    assert kept(to_message(FilterConfig(min_instruction_words=10))) == []


def test_short_label_answers_are_not_near_duplicates():
    """'no' = 'No.' and 'positive' = 'Positive' as shingles; distinct yes/no tasks are not duplicates."""
    tasks = [
        ("Tell whether the given number is prime.", "91", "no"),
        ("Is the given year a leap year?", "1900", "No."),
        ("Was the customer happy with the delivery?", "", "positive"),
        ("Classify the tone of the last message you wrote.", "", "Positive"),
        ("Does the sentence contain a question?", "Is it? Yes", "yes"),
    ]
    candidates = [_task(i, text, [Instance(given, output)]) for i, (text, given, output) in enumerate(tasks)]
    before = filter_tasks(candidates, [], FilterConfig(near_duplicate_threshold=0))
    assert all(v.kept for v in before.verdicts)  # no other rule stands in the way
    result = filter_tasks(candidates, [], FilterConfig())
    assert all(v.kept for v in result.verdicts) and result.funnel == {}


def test_near_duplicates_compare_input_and_output():
    output = "The answer is forty two, as the question above asks for the product of six and seven."
    first = _task(
        1, "Compute the product of the two numbers.", [Instance("six and seven, multiplied together", output)]
    )
    other_input = _task(
        2, "Explain the given sum step by step.", [Instance("a completely different input text", output)]
    )
    same = _task(3, "Say what the numbers below make.", [Instance("six and seven, multiplied together", output)])
    result = filter_tasks([first, other_input, same], [], FilterConfig())
    assert [v.kept for v in result.verdicts] == [True, True, False]
    assert result.verdicts[2].reasons[0] == "near_duplicate_response"


def test_near_duplicates_against_the_pool():
    text = "Rivers carry water from the hills to the sea, and on the way they shape the valleys they run through."
    pool = [_task(0, "Describe how rivers shape a landscape.", [Instance("", text)])]
    again = _task(1, "Write one sentence about water.", [Instance("", text)])
    result = filter_tasks([again], pool, FilterConfig())
    assert not result.verdicts[0].kept and result.funnel == {"near_duplicate_response": 1}


def _demo(task_id, pairs, clf=False):
    return TaskRecord(
        id=task_id, instruction="A seed task.", is_classification=clf, instances=[Instance(i, o) for i, o in pairs]
    )


def _shown(task, *demo_ids, instruction_context=("seed-9",)):
    """The lineage the instance stage leaves: the instruction prompt's tasks, then the demonstrations."""
    task.lineage.context_task_ids = [*instruction_context, *demo_ids]
    task.lineage.scores["demonstrations"] = float(len(demo_ids))
    return task


def test_an_instance_copying_a_demonstration_is_removed():
    demo = _demo("seed-1", [("The weather today", "It is sunny and warm, a good day for a walk.")])
    task = _shown(_task(1, "Write a short note to a friend about your weekend."), "seed-1")
    task.instances = [
        Instance("", "It is sunny and warm, a good day for a walk."),
        Instance("", "We went hiking and saw a deer near the lake."),
    ]
    result = filter_tasks([task], [demo], FilterConfig(near_duplicate_threshold=0))
    assert result.verdicts[0].kept and result.verdicts[0].reasons == ["copies_demonstration"]
    assert result.kept[0].instances == [Instance("", "We went hiking and saw a deer near the lake.")]
    only_copies = _shown(_task(2, "Describe the weather in one sentence please.", [task.instances[0]]), "seed-1")
    rejected = filter_tasks([only_copies], [demo], FilterConfig(near_duplicate_threshold=0))
    assert rejected.funnel == {"copies_demonstration": 1}  # the round's funnel names the rule
    # a task the instruction prompt showed was not a demonstration: its outputs were never in a prompt
    not_shown = _shown(_task(3, "Describe the weather in one sentence please."), instruction_context=["seed-1"])
    not_shown.instances = [task.instances[0]]
    assert filter_tasks([not_shown], [demo], FilterConfig(near_duplicate_threshold=0)).verdicts[0].kept


def test_a_classification_instance_may_share_a_label_but_not_an_input():
    demo = _demo("seed-c", [("I loved this film.", "positive"), ("Dull and slow.", "negative")], clf=True)
    task = TaskRecord(
        id="c",
        instruction="Is the restaurant review positive or negative?",
        is_classification=True,
        instances=[Instance("The soup was cold.", "negative"), Instance("I loved this film.", "positive")],
    )
    result = filter_tasks([_shown(task, "seed-c")], [demo], FilterConfig(near_duplicate_threshold=0))
    assert result.kept[0].instances == [Instance("The soup was cold.", "negative")]
    assert result.verdicts[0].reasons == ["copies_demonstration"]


def test_an_input_repeating_the_instruction_is_removed():
    instruction = "Translate the sentence into French."
    kept, reasons = clean_instances(
        [
            Instance("Translate the sentence into French.", "Traduisez la phrase."),
            Instance("I am tired.", "Je suis fatigué."),
        ],
        instruction=instruction,
    )
    assert kept == [Instance("I am tired.", "Je suis fatigué.")] and reasons == ["input_repeats_instruction"]
    echo = _task(1, instruction, [Instance("translate the sentence into french: Hello", "Bonjour")])
    assert filter_tasks([echo], [], FilterConfig()).funnel == {"input_repeats_instruction": 1}


def test_a_task_without_instances_is_rejected_as_such():
    result = filter_tasks([TaskRecord(id="n", instruction="Name three rivers of Europe.")], [], FilterConfig())
    assert result.funnel == {"no_valid_instances": 1}


def test_the_pool_serves_dedup_and_demonstrations_when_its_scores_come_from_elsewhere():
    """With pool_scores (the driver's sharded path) the pool still answers the rules that need its
    records, so both paths decide alike."""
    from services.filter.service import novelty_scores

    text = "Rivers carry water from the hills to the sea, and on the way they shape the valleys they run through."
    demo = _demo("seed-1", [("", "It is sunny and warm, a good day for a walk.")])
    pool = [demo, _task(0, "Describe how rivers shape a landscape.", [Instance("", text)])]
    candidates = [
        _task(1, "Write one sentence about water.", [Instance("", text)]),
        _shown(
            _task(2, "Tell me about your day.", [Instance("", "It is sunny and warm, a good day for a walk.")]),
            "seed-1",
        ),
        _task(3, "Name three animals that live in the sea.", [Instance("", "Whales, dolphins and octopuses.")]),
    ]
    whole = filter_tasks(candidates, pool, FilterConfig())
    split = filter_tasks(candidates, pool, FilterConfig(), pool_scores=novelty_scores(candidates, pool))
    assert whole.funnel == split.funnel == {"near_duplicate_response": 1, "copies_demonstration": 1}
    assert [v.reasons for v in whole.verdicts] == [v.reasons for v in split.verdicts]
