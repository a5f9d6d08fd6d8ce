import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.engines.base import Completion, ModelSessions, SamplingParams
from services.common.formats import load_seed_tasks, load_tasks
from services.common.records import Instance, TaskRecord
from services.common.store import RunStore
from services.evaluator import judge
from services.evaluator.bootstrap import mean_interval, paired_difference
from services.evaluator.gate import decide
from services.evaluator.metrics import TaskResult, exact_match, mean_over_tasks, normalize_label, score_instance
from services.evaluator.report import SECTIONS, build_report
from services.evaluator.service import EvaluatorService
from services.evaluator.split import split_by_task
from tests.tiny import fill_example_run


@settings(max_examples=50, deadline=None)
@given(st.floats(0.05, 0.95), st.integers(0, 1000))
def test_split_never_shares_a_task(fraction, seed):
    tasks = load_seed_tasks()
    train, heldout = split_by_task(tasks, fraction, seed)
    assert not {t.id for t in train} & {t.id for t in heldout}
    assert not {t.instruction for t in train} & {t.instruction for t in heldout}
    assert len(train) + len(heldout) == len(tasks)
    again = split_by_task(list(reversed(tasks)), fraction, seed)
    assert {t.id for t in again[1]} == {t.id for t in heldout}  # order of the input does not matter
    share = sum(t.is_classification for t in heldout) / max(len(heldout), 1)
    assert heldout == [] or abs(share - 28 / 116) < 0.15  # stratified


def test_metrics_hand_checked():
    assert normalize_label(" Positive.\nbecause it is nice") == "positive"
    assert exact_match("NEGATIVE!", "negative") == 1.0
    assert exact_match("not negative", "negative") == 0.0
    assert exact_match("", "") == 0.0
    clf, gen = TaskResult("c", "classification"), TaskResult("g", "generation")
    score_instance(clf, "spam", "spam")
    score_instance(clf, "ham", "spam")
    score_instance(gen, "the cat sat", "the cat sat on the mat")  # LCS 3, p 1, r 0.5 -> F 2/3
    assert clf.score == 0.5
    assert gen.score == pytest.approx(2 / 3)
    assert mean_over_tasks([clf, gen], "score") == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_over_tasks([clf, gen], "exact_match", "classification") == 0.5


def test_bootstrap_interval_on_constructed_case():
    constant = mean_interval({f"t{i}": 0.4 for i in range(30)}, resamples=1000, confidence=0.9)
    assert constant.low == constant.high == constant.estimate == pytest.approx(0.4)
    half = mean_interval({f"t{i}": float(i % 2) for i in range(400)}, resamples=4000, confidence=0.95, seed=1)
    standard_error = math.sqrt(0.25 / 400)
    assert half.estimate == 0.5
    assert half.low == pytest.approx(0.5 - 1.96 * standard_error, abs=0.01)
    assert half.high == pytest.approx(0.5 + 1.96 * standard_error, abs=0.01)
    diff = paired_difference(
        {"a": 0.1, "b": 0.2, "c": 0.3}, {"a": 0.2, "b": 0.3, "c": 0.4, "extra": 9.0}, resamples=1000, confidence=0.9
    )
    assert diff.estimate == pytest.approx(0.1) and diff.low == pytest.approx(0.1)  # pairs kept, extra task ignored


def test_gate_promotes_better_and_refuses_worse():
    incumbent = {f"t{i}": 0.30 + 0.01 * (i % 5) for i in range(40)}
    better = {t: s + 0.05 for t, s in incumbent.items()}
    worse = {t: s - 0.05 for t, s in incumbent.items()}
    noisy = {t: s + (0.2 if i % 2 else -0.2) for i, (t, s) in enumerate(incumbent.items())}
    gate = {"metric": "score", "confidence": 0.9, "resamples": 2000, "seed": 0}
    assert decide(better, incumbent, margin=0.0, **gate).promoted
    assert not decide(worse, incumbent, margin=0.0, **gate).promoted
    assert not decide(noisy, incumbent, margin=0.0, **gate).promoted  # no confident gain
    assert not decide(better, incumbent, margin=0.06, **gate).promoted  # under the margin
    first = decide(better, None, margin=0.0, **gate)
    assert first.promoted and first.reason == "no incumbent" and first.difference is None
    assert first.candidate.low < first.candidate.estimate < first.candidate.high
    assert first.candidate.estimate == pytest.approx(sum(better.values()) / len(better))


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Response B is more complete.\nVerdict: B", "B"),
        ("verdict: a", "A"),
        ("**Verdict:** Tie", "tie"),
        ("Verdict: A ... on reflection, Verdict: B", "B"),
        ("Verdict - response A", "A"),
        ("I prefer the second one.", None),
        ("", None),
        ("Verdict: Banana", None),
    ],
)
def test_judge_parser(text, verdict):
    assert judge.parse_verdict(text) == verdict


def test_judge_combines_both_orders():
    assert judge.combine("B", "A") == "b_wins"  # B first, and B (shown as A) when swapped
    assert judge.combine("A", "B") == "a_wins"
    assert judge.combine("A", "A") == "tie"  # position bias: always the first -> tie
    assert judge.combine(None, "A") == "tie"
    rates = judge.rates(["b_wins", "tie", "a_wins", "b_wins"])
    assert (rates.win, rates.tie, rates.loss, rates.pairs) == (0.5, 0.25, 0.25, 4)


class ScriptedEngine(ModelSessions):
    """A stand-in engine whose answers are scripted per prompt (the real engines are tested elsewhere)."""

    def __init__(self, answers):
        self.answers = answers
        self.loaded = None
        self.tokenizer = None  # the plain instruction templates

    def load(self, model_uri):
        self.loaded = model_uri

    def generate(self, prompts, params):
        return [Completion(self.answers(self.loaded, p), "stop") for p in prompts]

    def score_nll(self, prompts, responses, max_len=0):
        return [1.0 for _ in prompts]


def test_evaluate_and_compare_with_judge():
    tasks = [
        TaskRecord(
            id="c",
            instruction="Is it spam?",
            is_classification=True,
            instances=[Instance("Win money now", "spam"), Instance("Lunch at 1?", "ham")],
        ),
        TaskRecord(id="g", instruction="Name a colour.", instances=[Instance("", "blue sky")]),
        TaskRecord(id="p", instruction="Say something kind.", instances=[Instance("", "")]),
    ]  # judged only

    def answers(model, prompt):
        if prompt.startswith("Which response"):
            return "Verdict: A" if re.search(r"Response A: (spam|blue sky|ham|kind)", prompt) else "Verdict: B"
        good = model == "good"
        if "spam" in prompt or "Lunch" in prompt:
            return ("spam" if "Win" in prompt else "ham") if good else "spam"
        return "blue sky" if good and "colour" in prompt else ("kind words" if good else "red")

    service = EvaluatorService(ScriptedEngine(answers))
    good = service.evaluate("good", tasks, 0, SamplingParams(temperature=0), with_nll=True)
    assert [t.task_id for t in good.tasks] == ["c", "g"]  # the prompt without reference is not scored
    assert good.score == 1.0 and good.exact_match == 1.0 and good.nll == 1.0
    assert len(good.predictions) == 4
    comparison = service.compare(
        "bad", "good", tasks, 0, SamplingParams(temperature=0), judge_model="judge", resamples=500, confidence=0.9
    )
    assert comparison.a.score == pytest.approx((0.5 + 0.0) / 2)
    assert comparison.score_difference.estimate == pytest.approx(1.0 - 0.25)
    assert comparison.judged.pairs == 4 and comparison.judged.win > comparison.judged.loss
    unjudged = service.compare(
        "bad", "good", tasks, 0, SamplingParams(temperature=0), judge_model="", resamples=500, confidence=0.9
    )
    assert unjudged.judged is None  # no judge model: no judged comparison, not "all ties"


def test_report_has_every_section(tmp_path):
    store = RunStore(str(tmp_path))
    fill_example_run(store)
    page = build_report(store, "r")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 7  # + the curation score histogram
    assert "kept previous" in page and "too_short: 3" in page
    assert "<td>1</td><td>0.1500</td><td>90%: [0.1000, 0.2000]</td>" in page  # the gate's own interval
    assert "Write a haiku about &lt;autumn&gt;." in page and "nearest pool entry: <i>Write a poem.</i>" in page
    assert "rejected:too_short" in page and "Leaves fall" in page  # kept and rejected, with instances
    assert "round 1 (8 of 8 pairs, best rated first)" in page and "curation score 5" in page
    assert "kept score &ge; 5: 1 of 8" in page
    assert "<td>curate</td><td>12.2</td>" in page and "<b>13.8</b>" in page  # stage times and round total


def test_prompt_only_eval_files(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Tell me a joke."}\n{"instruction": "Describe rain.", "input": "briefly"}\n')
    tasks = load_tasks(path)
    assert [t.instances[0].output for t in tasks] == ["", ""]
    assert tasks[1].instances[0].input == "briefly"
