import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_jobs.report import SECTIONS, build_report
from ray_jobs.seed_split import split_by_task
from services.common.engines.base import Completion, ModelSessions, SamplingParams
from services.common.formats import load_seed_tasks, load_tasks
from services.common.records import Instance, TaskRecord
from services.common.store import RunStore
from services.evaluator import judge
from services.evaluator.gate import TaskMetrics, decide
from services.evaluator.intervals import length_controlled_difference, mean_interval, paired_difference
from services.evaluator.metrics import TaskResult, exact_match, mean_over_tasks, normalize_label, score_instance
from services.evaluator.service import EvaluatorService
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
    overall = sum(t.is_classification for t in tasks) / len(tasks)
    assert heldout == [] or abs(share - overall) < 0.15  # stratified


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


BOOT = {"resamples": 4000, "confidence": 0.9}


def test_intervals_on_constructed_cases():
    for method in ("t", "bca", "percentile"):
        constant = mean_interval({f"t{i}": 0.4 for i in range(30)}, method=method, **BOOT)
        assert constant.low == pytest.approx(constant.high) and constant.estimate == pytest.approx(0.4)
    half = mean_interval({f"t{i}": float(i % 2) for i in range(400)}, method="percentile", seed=1, **BOOT)
    standard_error = math.sqrt(0.25 / 400)
    assert half.estimate == 0.5
    assert half.low == pytest.approx(0.5 - 1.645 * standard_error, abs=0.01)
    diff = paired_difference(
        {"a": 0.1, "b": 0.2, "c": 0.3}, {"a": 0.2, "b": 0.3, "c": 0.4, "extra": 9.0}, method="t", **BOOT
    )
    assert diff.estimate == pytest.approx(0.1) and diff.low == pytest.approx(0.1)  # pairs kept, extra task ignored


# 17 per-task score differences of the shape the gate sees (a few large flips, many small moves)
SAMPLE = [0.31, -0.12, 0.05, 0.0, 1.0, -0.4, 0.22, 0.08, -0.05, 0.6, 0.0, 0.13, -0.27, 0.04, 0.35, -0.1, 0.5]


def test_the_t_interval_matches_scipy_and_the_percentile_bootstrap_is_narrower():
    from scipy import stats

    values = {f"t{i}": v for i, v in enumerate(SAMPLE)}
    ours = mean_interval(values, method="t", **BOOT)
    reference = stats.ttest_1samp(SAMPLE, 0.0).confidence_interval(confidence_level=0.9)
    assert ours.low == pytest.approx(reference.low, abs=1e-12) and ours.high == pytest.approx(reference.high, abs=1e-12)
    assert ours.standard_error == pytest.approx(stats.sem(SAMPLE))
    # the minimum detectable effect: (t_0.95 + t_0.80) x SE, df 16
    assert ours.minimum_detectable == pytest.approx((1.7459 + 0.8647) * stats.sem(SAMPLE), rel=1e-3)
    percentile = mean_interval(values, method="percentile", **BOOT)
    assert percentile.high - percentile.low < ours.high - ours.low  # why t is the default at small n


def test_bca_matches_scipy_within_resampling_noise():
    import numpy as np
    from scipy import stats

    values = {f"t{i}": v for i, v in enumerate(SAMPLE)}
    ours = mean_interval(values, method="bca", resamples=20000, confidence=0.9, seed=3)
    reference = stats.bootstrap(
        (np.array(SAMPLE),), np.mean, confidence_level=0.9, n_resamples=20000, method="BCa", random_state=7
    ).confidence_interval
    assert ours.low == pytest.approx(reference.low, abs=0.01) and ours.high == pytest.approx(reference.high, abs=0.01)


def test_a_stratified_t_interval_pools_the_strata_variances():
    import numpy as np
    from scipy import stats

    clf = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # high level, classification
    gen = [0.1, 0.15, 0.2, 0.12, 0.18, 0.1, 0.14, 0.2]  # low level, generation
    values = {f"c{i}": v for i, v in enumerate(clf)} | {f"g{i}": v for i, v in enumerate(gen)}
    strata = {k: ("classification" if k.startswith("c") else "generation") for k in values}
    stratified = mean_interval(values, method="t", strata=strata, **BOOT)
    plain = mean_interval(values, method="t", **BOOT)
    n = len(values)
    parts = [(len(g) / n) ** 2 * np.var(g, ddof=1) / len(g) for g in (clf, gen)]
    dof = sum(parts) ** 2 / sum(p**2 / (len(g) - 1) for p, g in zip(parts, (clf, gen)))
    half_width = stats.t.ppf(0.95, dof) * math.sqrt(sum(parts))
    assert stratified.estimate == pytest.approx(plain.estimate)  # the same mean over tasks
    assert stratified.high - stratified.estimate == pytest.approx(half_width)
    assert stratified.high - stratified.low < plain.high - plain.low  # the level difference is not noise


def test_the_length_controlled_difference_removes_a_pure_length_effect():
    lengths_a = {f"t{i}": 20.0 + i for i in range(30)}
    lengths_b = {t: n * (2.0 if i % 3 else 0.8) for i, (t, n) in enumerate(lengths_a.items())}
    a = {t: 0.3 for t in lengths_a}
    # B's score rises with how much longer its answer is, and not otherwise
    b = {t: 0.3 + 0.4 * (math.log1p(lengths_b[t]) - math.log1p(lengths_a[t])) for t in lengths_a}
    raw = paired_difference(a, b, method="t", **BOOT)
    controlled = length_controlled_difference(a, b, lengths_a, lengths_b, confidence=0.9)
    assert raw.estimate > 0.02
    assert controlled.estimate == pytest.approx(0.0, abs=1e-9)


def _metrics(scores: dict[str, float], nll: dict[str, float] | None = None) -> dict[str, TaskMetrics]:
    nll = nll or {t: 1.0 for t in scores}
    return {
        t: TaskMetrics(s, nll[t], s, "classification" if i % 3 == 0 else "generation")
        for i, (t, s) in enumerate(scores.items())
    }


GATE = {"method": "t", "confidence": 0.9, "resamples": 2000, "seed": 0, "stratify": True}


def test_gate_on_score_promotes_better_and_refuses_worse():
    incumbent = {f"t{i}": 0.30 + 0.01 * (i % 5) for i in range(40)}
    better = {t: s + 0.05 for t, s in incumbent.items()}
    worse = {t: s - 0.05 for t, s in incumbent.items()}
    noisy = {t: s + (0.2 if i % 2 else -0.2) for i, (t, s) in enumerate(incumbent.items())}
    gate = {"metric": "score", "score_margin": 0.0, **GATE}
    against = {"incumbent": _metrics(incumbent)}
    assert decide(_metrics(better), against, margin=0.0, **gate).promoted
    assert not decide(_metrics(worse), against, margin=0.0, **gate).promoted
    assert not decide(_metrics(noisy), against, margin=0.0, **gate).promoted  # no confident gain
    assert not decide(_metrics(better), against, margin=0.06, **gate).promoted  # under the margin
    first = decide(_metrics(better), {}, margin=0.0, **gate)
    assert first.promoted and first.reason == "no incumbent" and first.comparisons == []
    assert first.candidate.low < first.candidate.estimate < first.candidate.high
    assert first.candidate.estimate == pytest.approx(sum(better.values()) / len(better))


def test_the_nll_gate_needs_a_lower_nll_and_a_score_that_is_not_worse():
    tasks = [f"t{i}" for i in range(40)]
    score = {t: 0.3 + 0.01 * (i % 7) for i, t in enumerate(tasks)}
    nll = {t: 2.0 + 0.05 * (i % 4) for i, t in enumerate(tasks)}
    incumbent = _metrics(score, nll)
    likelier = _metrics(score, {t: v - 0.1 for t, v in nll.items()})
    likelier_but_worse = _metrics({t: v - 0.1 for t, v in score.items()}, {t: v - 0.1 for t, v in nll.items()})
    gate = {"metric": "nll", "margin": 0.0, "score_margin": 0.05, **GATE}
    decision = decide(likelier, {"incumbent": incumbent}, **gate)
    assert decision.promoted and decision.comparisons[0].gain.estimate == pytest.approx(0.1)  # positive = better
    refused = decide(likelier_but_worse, {"incumbent": incumbent}, **gate)
    assert not refused.promoted and "score difference lower bound" in refused.reason
    # it must beat every comparator: a control that is as likely as the candidate stops it
    both = decide(likelier, {"incumbent": incumbent, "control": likelier}, **gate)
    assert not both.promoted and [c.passed for c in both.comparisons] == [True, False]


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
        self.params = params
        out = []
        for p in prompts:  # stop strings cut the answer, as every real engine does
            text = self.answers(self.loaded, p)
            cuts = [text.index(s) for s in params.stop if s in text]
            out.append(Completion(text[: min(cuts)] if cuts else text, "stop", len(text.split())))
        return out

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
    compare = {"resamples": 500, "confidence": 0.9, "method": "t", "stratify": False}
    comparison = service.compare("bad", "good", tasks, 0, SamplingParams(temperature=0), judge_model="judge", **compare)
    assert comparison.a.score == pytest.approx((0.5 + 0.0) / 2)
    assert comparison.score_difference.estimate == pytest.approx(1.0 - 0.25)
    assert comparison.judged.pairs == 4 and comparison.judged.win > comparison.judged.loss
    unjudged = service.compare("bad", "good", tasks, 0, SamplingParams(temperature=0), judge_model="", **compare)
    assert unjudged.judged is None  # no judge model: no judged comparison, not "all ties"


LETTER = "Dear Ms Lee,\n\nThank you for the interview on Monday.\n\nI look forward to hearing from you.\n\nBest, Sam"


def test_a_multi_paragraph_answer_is_scored_whole():
    """A chat answer ends at its EOS, not at its first blank line: every paragraph counts, and its
    length is recorded beside the score."""
    from services.common.rouge import rouge_l

    task = TaskRecord(id="letter", instruction="Write a thank-you note.", instances=[Instance("", LETTER)])
    engine = ScriptedEngine(lambda model, prompt: LETTER)
    result = EvaluatorService(engine).evaluate("m", [task], 0, SamplingParams(temperature=0, max_new_tokens=256))
    assert result.score == pytest.approx(1.0) and result.score > rouge_l("Dear Ms Lee,", LETTER)
    assert result.predictions[0].instances[0].output == LETTER.strip()
    assert result.answer_words == len(LETTER.split()) and "\n\n" not in engine.params.stop
    stopped = EvaluatorService(engine).evaluate("m", [task], 0, SamplingParams(temperature=0), stop=("\n\n",))
    assert stopped.score < 0.5 and stopped.stops == (
        "\n\nInput:",
        "\n\nOutput:",
        "\nTask:",
        "\nInstruction:",
        "\nContext:",
        "\nAnswer:",
        "\n\n",
    )


def test_report_has_every_section(tmp_path):
    store = RunStore(str(tmp_path))
    fill_example_run(store)
    page = build_report(store, "r")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert page.count("data:image/png;base64,") == 7  # + the curation score histogram
    assert "kept previous" in page and "too_short: 3" in page
    assert "<td>1</td><td>0.1500</td><td>90%: [0.1000, 0.2000]</td>" in page  # the gate's own interval
    assert "<td>vs incumbent</td><td>+0.3000 [-0.1000, +0.7000] (MDE 0.410)</td>" in page  # what the gate can see
    assert "<td>control (seeds only)</td><td>c0</td><td>0.3100</td><td>1.7000</td><td>15</td>" in page  # test
    assert "final minus control: score -0.0300 [-0.1000, +0.0400]" in page
    assert "Write a haiku about &lt;autumn&gt;." in page and "nearest pool entry: <i>Write a poem.</i>" in page
    assert "rejected:too_short" in page and "Leaves fall" in page  # kept and rejected, with instances
    assert "verdict: kept; max ROUGE-L 0.310" in page  # from the typed verdict
    assert "round 1 (8 of 8 pairs, best rated first)" in page and "curation score 5" in page
    assert "kept score &ge; 5: 1 of 8" in page
    assert "<td>curate</td><td>12.2</td>" in page and "<b>13.8</b>" in page  # stage times and round total


def test_prompt_only_eval_files(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Tell me a joke."}\n{"instruction": "Describe rain.", "input": "briefly"}\n')
    tasks = load_tasks(path)
    assert [t.instances[0].output for t in tasks] == ["", ""]
    assert tasks[1].instances[0].input == "briefly"
