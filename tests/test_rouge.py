"""Our ROUGE-L must equal rouge-score's F bit for bit, and so must every 0.7 decision."""

from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from rouge_score.tokenize import tokenize as _reference_tokenize

from services.common.formats import load_seed_tasks, load_tasks
from services.common.rouge import NoveltyIndex, rouge_l, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference(prediction: str, target: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def test_tie_at_boundary_matches_rouge_score():
    a, b = "a b c d e f g h", "a b c d e f g x y z w q"  # lengths 8 and 12, LCS 7
    assert reference(a, b) == 0.7000000000000001
    assert rouge_l(a, b) == reference(a, b)
    assert NoveltyIndex([b]).filter_in_order([a], 0.7)[0][0] is False


def test_all_pairs_of_seed_instructions(shared_seeds):
    instructions = [t.instruction for t in load_seed_tasks()] + [t.instruction for t in load_tasks(shared_seeds)]
    index = NoveltyIndex(instructions)
    for text in instructions:  # every pair, both directions
        ours = [rouge_l(text, other) for other in instructions]
        theirs = [reference(text, other) for other in instructions]
        assert ours == theirs
        best, nearest = index.nearest(text)
        assert best == max(theirs) and theirs[nearest] == best


def test_builtin_seed_pairs():
    instructions = [t.instruction for t in load_seed_tasks()]
    for text in instructions[::5]:
        assert [rouge_l(text, o) for o in instructions] == [reference(text, o) for o in instructions]


_alphabet = st.sampled_from(list("abc xyz ABC 123 .,!?-'") + ["é", "中", "文", "😀", "İ", "ß", "\n", "\t"])
_texts = st.lists(st.one_of(_alphabet, st.sampled_from(["the", "cat", "sat", "on", "mat", "a"])), max_size=30).map(
    lambda parts: " ".join(parts)
)


@settings(max_examples=400, deadline=None)
@given(_texts, _texts)
def test_hypothesis_texts(a, b):
    assert tokenize(a) == _reference_tokenize(a, None)
    assert rouge_l(a, b) == reference(a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(_texts, min_size=1, max_size=12), st.lists(_texts, min_size=1, max_size=12))
def test_filter_decisions_match_reference(pool, candidates):
    kept_reference, grown = [], list(pool)
    for text in candidates:
        keep = all(reference(text, other) < 0.7 for other in grown)
        kept_reference.append(keep)
        if keep:
            grown.append(text)
    ours = [kept for kept, _, _ in NoveltyIndex(pool).filter_in_order(candidates, 0.7)]
    assert ours == kept_reference


@settings(max_examples=150, deadline=None)
@given(st.lists(_texts, min_size=1, max_size=40), _texts)
def test_nearest_is_the_brute_force_max_with_earliest_tie(pool, text):
    """The bound-pruned search returns exactly the max over the whole pool, and the first entry
    reaching it."""
    scores = [reference(text, other) for other in pool]
    best, index = NoveltyIndex(pool).nearest(text)
    assert best == max(scores)
    if best > 0:
        assert index == scores.index(best)
    else:
        assert index == -1


def test_index_saves_and_loads(tmp_path):
    from services.common.store import RunStore

    store = RunStore(str(tmp_path))
    index = NoveltyIndex(["Write a poem about the sea.", "List three prime numbers."])
    index.add("Translate the sentence into French.")
    index.save(store, store.uri("run", "novelty_index.json"))
    loaded = NoveltyIndex.load(store, store.uri("run", "novelty_index.json"))
    assert loaded.texts == index.texts
    assert loaded.nearest("Translate this sentence into French.") == index.nearest(
        "Translate this sentence into French."
    )


@settings(max_examples=80, deadline=None)
@given(
    st.lists(_texts, min_size=1, max_size=12),
    st.lists(_texts, min_size=1, max_size=16),
    st.integers(min_value=1, max_value=5),
)
def test_the_filters_parallel_part_decides_the_same(pool, candidates, per_shard):
    """novelty_scores over shards of candidates, then filter_tasks with pool_scores (only candidates
    against those kept before them): the verdicts of filtering against the pool in one go."""
    from services.common.config import FilterConfig
    from services.common.records import TaskRecord
    from services.filter.service import filter_tasks, novelty_scores

    pool_tasks = [TaskRecord(id=f"p{i}", instruction=t) for i, t in enumerate(pool)]
    tasks = [TaskRecord(id=f"c{i}", instruction=t) for i, t in enumerate(candidates)]
    rules_off = FilterConfig(instruction_rules=False)
    whole = filter_tasks(tasks, pool_tasks, rules_off, check_instances=False)
    scores = [
        s
        for start in range(0, len(tasks), per_shard)
        for s in novelty_scores(tasks[start : start + per_shard], pool_tasks)
    ]
    split = filter_tasks(tasks, [], rules_off, check_instances=False, pool_scores=scores)
    assert split.verdicts == whole.verdicts
    assert [t.id for t in split.kept] == [t.id for t in whole.kept]
