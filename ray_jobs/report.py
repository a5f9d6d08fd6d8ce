"""The run report: one self-contained HTML file (plots as embedded PNG) a person can open anywhere.

Sections: funnel per round, max ROUGE-L against the pool (Self-Instruct's Figure 3), instruction
lengths, leading verbs, a browsable sample of kept and rejected tasks (instances, reasons, nearest
pool entry), the backtranslated pairs with their curation scores, training loss curves, evaluation
scores by round with their intervals, the promotion decisions, the test stage and its standard benchmarks
(lm-eval), and the time each stage took.
Everything is read from the run store, each stage as its typed result; nothing is written by hand.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from services.common.config import ReinstructConfig  # noqa: E402
from services.common.prompts import CURATION_SCORES  # noqa: E402
from services.common.store import RunStore  # noqa: E402
from services.evaluator.intervals import Interval  # noqa: E402

from .manifest import (  # noqa: E402
    Dataset,
    Decision,
    Evaluated,
    Filtered,
    Instructions,
    RoundRecord,
    Tested,
    Trained,
    rounds_of,
)

SECTIONS = (
    "funnel",
    "rouge",
    "lengths",
    "verbs",
    "samples",
    "backtranslation",
    "loss",
    "scores",
    "promotion",
    "test",
    "benchmarks",
    "timing",
)
SAMPLE_SIZE = 25  # tasks shown per round and verdict


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _each(rounds: list[RoundRecord], name: str, kind):
    """(round, result) for every round that committed stage name."""
    return [(r.index, result) for r in rounds if (result := r.get(name, kind)) is not None]


def _funnel(rounds: list[RoundRecord]) -> str:
    rows: list[tuple[int, Filtered]] = _each(rounds, "filter", Filtered)
    if not rows:
        return "<p>No filtered rounds yet.</p>"
    rules = sorted({rule for _, f in rows for rule in f.funnel})
    figure, axis = plt.subplots(figsize=(7, 3.2))
    labels = [f"round {k}" for k, _ in rows]
    bottom = [0] * len(rows)
    kept = [f.kept_count for _, f in rows]
    axis.bar(labels, kept, label="kept", color="#2a9d8f")
    bottom = kept
    for rule in rules:
        values = [f.funnel.get(rule, 0) for _, f in rows]
        axis.bar(labels, values, bottom=bottom, label=rule)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_ylabel("candidates")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    table = "".join(
        f"<tr><td>{k}</td><td>{f.candidates}</td><td>{f.kept_count}</td><td>"
        + html.escape(", ".join(f"{r}: {n}" for r, n in sorted(f.funnel.items())))
        + "</td></tr>"
        for k, f in rows
    )
    return (
        _png(figure) + f"<table><tr><th>round</th><th>candidates</th><th>kept</th><th>removed</th></tr>{table}</table>"
    )


def _rouge(rounds: list[RoundRecord], threshold: float) -> str:
    figure, axis = plt.subplots(figsize=(7, 3))
    plotted = False
    for k, kept in _each(rounds, "filter", Filtered):
        if kept.max_rouge_l:
            axis.hist(kept.max_rouge_l, bins=[i / 20 for i in range(21)], alpha=0.6, label=f"round {k}")
            plotted = True
    if not plotted:
        plt.close(figure)
        return "<p>No candidates scored yet.</p>"
    axis.axvline(threshold, color="black", linestyle="--", linewidth=1)  # the run's filter.rouge_l_threshold
    axis.set_xlabel("max ROUGE-L F against the pool")
    axis.set_ylabel("instructions")
    axis.legend(fontsize=8)
    return _png(figure)


def _instructions(store: RunStore, rounds: list[RoundRecord]) -> dict[int, list[str]]:
    written = _each(rounds, "generate_instructions", Instructions)
    return {k: [t.instruction for t in result.tasks(store)] for k, result in written if result.count}


def _lengths(instructions: dict[int, list[str]]) -> str:
    if not instructions:
        return "<p>No instructions generated yet.</p>"
    figure, axis = plt.subplots(figsize=(7, 3))
    for k, texts in instructions.items():
        axis.hist([len(t.split()) for t in texts], bins=range(0, 41, 2), alpha=0.6, label=f"round {k}")
    axis.set_xlabel("words per instruction")
    axis.set_ylabel("instructions")
    axis.legend(fontsize=8)
    return _png(figure)


def _verbs(instructions: dict[int, list[str]]) -> str:
    words = Counter(t.split()[0].strip(".,:;!?").lower() for texts in instructions.values() for t in texts if t.split())
    if not words:
        return "<p>No instructions generated yet.</p>"
    common = words.most_common(20)
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.barh([w for w, _ in reversed(common)], [n for _, n in reversed(common)], color="#264653")
    axis.set_xlabel("instructions starting with the word")
    return _png(figure)


def _task_html(task) -> str:
    lineage = task.lineage
    verdict = lineage.filter
    nearest = verdict.nearest_instruction if verdict else ""
    facts = [f"verdict: {verdict.label if verdict else '-'}"]
    if verdict and verdict.nearest_instruction:
        facts.append(f"max ROUGE-L {verdict.max_rouge_l:.3f}")
    if "curation" in lineage.scores:
        facts.append(f"curation score {lineage.scores['curation']:.0f}")
    facts.append("classification" if task.is_classification else "open-ended")
    instances = "".join(
        "<li>"
        + (f"<b>input</b> {html.escape(i.input)}<br>" if i.input.strip() else "")
        + f"<b>output</b> {html.escape(i.output)}</li>"
        for i in task.instances
    )
    return (
        f"<details><summary>{html.escape(task.instruction)}</summary><p class='facts'>{html.escape('; '.join(facts))}"
        + (f"<br>nearest pool entry: <i>{html.escape(nearest)}</i>" if nearest else "")
        + f"</p><ol>{instances}</ol></details>"
    )


def _samples(store: RunStore, rounds: list[RoundRecord]) -> str:
    parts = []
    for k, result in _each(rounds, "filter", Filtered):
        if not result.candidates:
            continue
        for label, uri in (("kept", result.kept_uri), ("rejected", result.rejected_uri)):
            tasks = store.read_tasks(uri) if uri else []
            shown = "".join(_task_html(t) for t in tasks[:SAMPLE_SIZE])
            parts.append(f"<h3>round {k}: {label} ({min(len(tasks), SAMPLE_SIZE)} of {len(tasks)})</h3>{shown}")
    return "".join(parts) or "<p>No filtered rounds yet.</p>"


def _backtranslation(store: RunStore, rounds: list[RoundRecord]) -> str:
    curated = [(k, result.tasks(store)) for k, result in _each(rounds, "curate", Dataset) if result.count]
    if not curated:
        return "<p>No backtranslated pairs yet.</p>"
    figure, axis = plt.subplots(figsize=(7, 2.8))
    width = 0.8 / len(curated)
    for n, (k, tasks) in enumerate(curated):
        counts = Counter(round(t.lineage.scores.get("curation", 0)) for t in tasks)
        axis.bar(
            [score + n * width for score in CURATION_SCORES],
            [counts.get(score, 0) for score in CURATION_SCORES],
            width=width,
            label=f"round {k}",
        )
    labels = ["unreadable", *map(str, CURATION_SCORES[1:])]
    axis.set_xticks([score + 0.4 - width / 2 for score in CURATION_SCORES], labels)
    axis.set_xlabel("self-curation score")
    axis.set_ylabel("pairs")
    axis.legend(fontsize=8)
    pairs = "".join(
        f"<h3>round {k} ({min(len(tasks), SAMPLE_SIZE)} of {len(tasks)} pairs, best rated first)</h3>"
        + "".join(
            _task_html(t) for t in sorted(tasks, key=lambda t: -t.lineage.scores.get("curation", 0))[:SAMPLE_SIZE]
        )
        for k, tasks in curated
    )
    thresholds = "".join(
        f"<li>round {k}: kept score &ge; {f.curation_threshold:g}: {f.kept_count} of {f.candidates}"
        + (f" (rater {html.escape(f.rater)}, selection {html.escape(f.selection)}" if f.rater else "")
        + (f", control AUC {f.rater_auc:.3f}" if f.rater_auc is not None else "")
        + (")" if f.rater else "")
        + "</li>"
        for k, f in _each(rounds, "filter_augmented", Filtered)
        if f.candidates
    )
    return _png(figure) + (f"<ul>{thresholds}</ul>" if thresholds else "") + pairs


def _timing(rounds: list[RoundRecord]) -> str:
    rows = [(r.index, stage, result.elapsed_s) for r in rounds for stage, result in r.stages.items()]
    if not rows:
        return "<p>No stage timed yet.</p>"
    by_round: dict[int, float] = {}
    for k, _, seconds in rows:
        by_round[k] = by_round.get(k, 0.0) + seconds
    body = "".join(
        f"<tr><td>{k}</td><td>{html.escape(stage)}</td><td>{seconds:.1f}</td></tr>" for k, stage, seconds in rows
    )
    totals = "".join(
        f"<tr><td>{k}</td><td><b>round total</b></td><td><b>{t:.1f}</b></td></tr>" for k, t in by_round.items()
    )
    return f"<table><tr><th>round</th><th>stage</th><th>seconds</th></tr>{body}{totals}</table>"


def _loss(rounds: list[RoundRecord]) -> str:
    figure, axis = plt.subplots(figsize=(7, 3))
    plotted = False
    for k, trained in _each(rounds, "train", Trained):
        if trained.losses:
            axis.plot(range(1, len(trained.losses) + 1), trained.losses, label=f"model {k}")
            plotted = True
    if not plotted:
        plt.close(figure)
        return "<p>No training yet.</p>"
    axis.set_xlabel("step")
    axis.set_ylabel("loss (response tokens)")
    axis.legend(fontsize=8)
    return _png(figure)


def _scores(rounds: list[RoundRecord]) -> str:
    """Each model's gate metric with the interval the gate computed for it (the promote stage's),
    beside its task score and answer length, so a length or format effect is visible."""
    points = [
        (k, Interval(d.candidate, *d.candidate_interval, d.confidence), d)
        for k, d in _each(rounds, "promote", Decision)
        if len(d.candidate_interval) == 2
    ]
    if not points:
        return "<p>No evaluations yet.</p>"
    evaluations = dict(_each(rounds, "evaluate", Evaluated))
    control = next((c for _, c in _each(rounds, "control_evaluate", Evaluated)), None)
    metric = points[-1][2].metric
    figure, axis = plt.subplots(figsize=(7, 3))
    xs = [k for k, _, _ in points]
    ys = [i.estimate for _, i, _ in points]
    errors = [[i.estimate - i.low for _, i, _ in points], [i.high - i.estimate for _, i, _ in points]]
    axis.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, label="round's model")
    if control is not None and metric in ("nll", "score", "rouge_l"):
        axis.axhline(getattr(control, metric), color="#c60", linestyle="--", label="seeds-only control")
        axis.legend(fontsize=8)
    axis.set_xticks(xs)
    axis.set_xlabel("model (round)")
    axis.set_ylabel(f"dev {metric} ({points[-1][2].interval or 'bootstrap'} CI)")
    rows = []
    for k, i, d in points:
        ev = evaluations.get(k)
        extra = (
            f"<td>{ev.score:.4f}</td><td>{ev.nll:.4f}</td><td>{ev.answer_words:.0f}</td>" if ev else "<td>-</td>" * 3
        )
        rows.append(
            f"<tr><td>{k}</td><td>{i.estimate:.4f}</td>"
            f"<td>{d.confidence:.0%}: [{i.low:.4f}, {i.high:.4f}]</td>{extra}</tr>"
        )
    if control is not None:
        rows.append(
            f"<tr><td>control (seeds only)</td><td>-</td><td>-</td><td>{control.score:.4f}</td>"
            f"<td>{control.nll:.4f}</td><td>{control.answer_words:.0f}</td></tr>"
        )
    stops = next((ev.stops for ev in evaluations.values()), [])
    note = (
        f"<p class='facts'>Answers end at the model's EOS{' or at ' + html.escape(repr(stops)) if stops else ''}"
        "; words: mean answer length.</p>"
    )
    head = f"<tr><th>model</th><th>{metric}</th><th>interval</th><th>score</th><th>NLL</th><th>words</th></tr>"
    return _png(figure) + f"<table>{head}{''.join(rows)}</table>" + note


def _bounds(values: list[float]) -> str:
    return f"{values[0]:+.4f} [{values[1]:+.4f}, {values[2]:+.4f}]" if len(values) == 3 else "-"


def _promotion(rounds: list[RoundRecord]) -> str:
    rows = []
    for k, decision in _each(rounds, "promote", Decision):
        verdict = "promoted" if decision.promoted else "kept previous"
        gates = "".join(
            f"<tr><td></td><td>vs {html.escape(g.against)}</td><td>{_bounds(g.gain)} (MDE {g.gain_mde:.3f})</td>"
            f"<td>{_bounds(g.score_difference)} (MDE {g.score_mde:.3f})</td>"
            f"<td>{_bounds(g.length_controlled_score_difference)}</td>"
            f"<td>{'passed' if g.passed else 'failed'}</td></tr>"
            for g in decision.gates()
        )
        rows.append(
            f"<tr><td>{k}</td><td><b>{verdict}</b></td><td colspan='4'>{html.escape(decision.reason)}<br>"
            f"model used next: {html.escape(decision.model_uri)}</td></tr>{gates}"
        )
    if not rows:
        return "<p>No decisions yet.</p>"
    return (
        "<p class='facts'>Gains are positive when the candidate is better; MDE: the smallest true effect "
        "the gate detects at 80% power on these tasks.</p>"
        "<table><tr><th>round</th><th>decision</th><th>metric gain</th><th>score difference</th>"
        "<th>score at equal length</th><th>check</th></tr>" + "".join(rows) + "</table>"
    )


def _test(rounds: list[RoundRecord]) -> str:
    tests = _each(rounds, "test", Tested)
    if not tests:
        return "<p>No test stage yet.</p>"
    _, t = tests[-1]
    models = [("model 0", t.model_0, t.model_0_score, t.model_0_nll, t.answer_words.get("model_0"))]
    if t.control_model:
        models.append(
            ("control (seeds only)", t.control_model, t.control_score, t.control_nll, t.answer_words.get("control"))
        )
    models.append(("final", t.final_model, t.final_score, t.final_nll, t.answer_words.get("final")))
    rows = "".join(
        f"<tr><td>{name}</td><td>{html.escape(uri)}</td><td>{score:.4f}</td><td>{nll:.4f}</td>"
        f"<td>{(words or 0):.0f}</td></tr>"
        for name, uri, score, nll, words in models
    )
    facts = [
        f"final minus model 0: score {_bounds(t.difference)}",
        f"NLL gain {_bounds(t.nll_gain)}",
        f"score at equal length {_bounds(t.length_controlled_difference)}",
    ]
    if t.over_control:
        facts.append(
            f"final minus control: score {_bounds(t.over_control)}, NLL gain {_bounds(t.nll_gain_over_control)}"
        )
    return (
        f"<p>{t.num_tasks} test tasks that chose nothing; {t.confidence:.0%} {t.interval} intervals.</p>"
        "<table><tr><th>model</th><th>uri</th><th>score</th><th>NLL</th><th>words</th></tr>"
        f"{rows}</table><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>"
    )


_MODELS = (("model_0", "model 0"), ("control", "control (seeds only)"), ("final", "final"))


def _tested(rounds: list[RoundRecord]) -> tuple[Tested | None, list]:
    """The run's test stage and its standard benchmarks' results (None and [] before it ran)."""
    tests = _each(rounds, "test", Tested)
    return (tests[-1][1], tests[-1][1].benchmark_results()) if tests else (None, [])


def _benchmarks_heading(rounds: list[RoundRecord]) -> str:
    """The section's heading names the models the test stage benchmarked (the control only if it ran)."""
    _, results = _tested(rounds)
    labels = [label for key, label in _MODELS if any(b.model == key for b in results)]
    named = ", ".join(labels[:-1]) + f" and {labels[-1]}" if len(labels) > 1 else "".join(labels)
    return "Standard benchmarks (lm-evaluation-harness)" + (f": {named}" if named else "")


def _benchmarks(rounds: list[RoundRecord]) -> str:
    """The test stage's standard benchmarks (lm-eval): a table per task, a row per metric, a column per
    model, each value with lm-eval's standard error."""
    t, results = _tested(rounds)
    if not results:
        return "<p>No standard benchmarks (evaluation.benchmarks names none).</p>"
    models = [(key, label) for key, label in _MODELS if any(b.model == key for b in results)]
    parts = [
        f"<p class='facts'>lm-evaluation-harness {html.escape(t.lm_eval_version)}, through its "
        f"{html.escape({'vllm': 'vLLM', 'hf': 'HF'}.get(t.benchmark_adapter or 'hf', t.benchmark_adapter))} adapter; "
        f"prompts rendered {html.escape(t.benchmark_prompt_style)} (as every stage renders them); "
        f"{'all examples' if not t.benchmark_limit else f'at most {t.benchmark_limit} examples per task'}; "
        "&plusmn; lm-eval's standard error.</p>"
    ]
    for task in dict.fromkeys(b.task for b in results):
        by_model = {b.model: b for b in results if b.task == task}
        first = next(iter(by_model.values()))
        head = "".join(f"<th>{html.escape(label)}</th>" for _, label in models)
        rows = []
        for metric in first.metrics:
            better = first.higher_is_better.get(metric)
            arrow = " &uarr;" if better else " &darr;" if better is False else ""
            cells = []
            for key, _ in models:
                b = by_model.get(key)
                if b is None or metric not in b.metrics:
                    cells.append("<td>-</td>")
                    continue
                stderr = f" &plusmn; {b.stderrs[metric]:.4f}" if metric in b.stderrs else ""
                cells.append(f"<td>{b.metrics[metric]:.4f}{stderr}</td>")
            rows.append(f"<tr><td>{html.escape(metric)}{arrow}</td>{''.join(cells)}</tr>")
        source = f"; {html.escape(first.source)}" if first.source else ""
        parts.append(
            f"<h3>{html.escape(task)} ({first.samples} examples{source})</h3>"
            f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"
        )
    return "".join(parts)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em}
img{max-width:100%}details{margin:.2em 0}summary{cursor:pointer}.facts{color:#555;font-size:.9em;margin:.3em 1em}
h3{font-size:1em;margin-top:1.2em}"""


def _config(manifest: dict) -> ReinstructConfig:
    """The run's own config (the manifest keeps it), else the defaults."""
    try:
        return ReinstructConfig.model_validate(manifest.get("config") or {})
    except ValueError:  # a manifest of an older version
        return ReinstructConfig()


def build_report(store: RunStore, run_id: str) -> str:
    manifest = store.load_manifest(run_id)
    rounds = rounds_of(manifest)
    config = _config(manifest)
    instructions = _instructions(store, rounds)
    sections = {
        "funnel": ("Funnel per round", _funnel(rounds)),
        "rouge": ("Max ROUGE-L against the pool", _rouge(rounds, config.filter.rouge_l_threshold)),
        "lengths": ("Instruction lengths", _lengths(instructions)),
        "verbs": ("Most common leading words", _verbs(instructions)),
        "samples": ("Kept and rejected tasks (a sample; click to open)", _samples(store, rounds)),
        "backtranslation": ("Backtranslated pairs and their self-curation scores", _backtranslation(store, rounds)),
        "loss": ("Training loss", _loss(rounds)),
        "scores": ("Held-out evaluation by round", _scores(rounds)),
        "promotion": ("Promotion decisions", _promotion(rounds)),
        "test": ("Test: model 0, the seeds-only control and the final model", _test(rounds)),
        "benchmarks": (_benchmarks_heading(rounds), _benchmarks(rounds)),
        "timing": ("Time per stage", _timing(rounds)),
    }
    body = "".join(
        f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, (title, content) in sections.items()
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>reinstruct run {html.escape(run_id)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>reinstruct run {html.escape(run_id)}</h1>"
        f"<p>status: {html.escape(str(manifest.get('status', '?')))}; rounds: {len(rounds)}</p>{body}</body></html>"
    )


def write_report(store: RunStore, run_id: str) -> str:
    uri = store.uri(run_id, "report.html")
    store.write_bytes(uri, build_report(store, run_id).encode())
    return uri
