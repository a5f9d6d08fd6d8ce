"""How well each self-curation rater tells a fitting instruction from a wrong one: ROC AUC of matched
seed pairs (a task's instruction and input with its own output) over their shuffled twins (the same
outputs under another task's instruction), the control the loop runs every round.

    python -m benchmarks.curation_auc [--model builtin:smollm2-135m] [--pairs 24] [--prompt-format auto]

Raters (services/generator/backtranslation.py): rubric (Humpback's rubric, the expected score read
from the probabilities of "1".."5", with and without contextual calibration) and likelihood (PMI).
The interval resamples seed tasks (each with its matched and shuffled pair), 90%, 2000 resamples.
CPU: the full run on SmolLM2-135M takes a few minutes on 2 cores."""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time

from services.common.engines import create_engine
from services.common.formats import load_seed_tasks
from services.common.rendering import Renderer
from services.generator import backtranslation as bt

from . import parse_args


def _interval(matched: list[float], shuffled: list[float], resamples: int = 2000) -> list[float]:
    rng = random.Random(0)
    n = len(matched)
    aucs = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        aucs.append(bt.rater_auc([matched[i] for i in picks], [shuffled[i] for i in picks]))
    aucs.sort()
    return [round(aucs[int(0.05 * resamples)], 3), round(aucs[int(0.95 * resamples) - 1], 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--pairs", type=int, default=24, help="matched pairs (each with its shuffled twin)")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"])
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, quick={"model": "builtin:tiny-llama", "pairs": 3})
    control = bt.control_pairs(load_seed_tasks(), args.pairs, args.seed)
    labels = [t.lineage.scores["matched"] for t in control]
    engine = create_engine("hf")
    engine.load(args.model)
    results: dict = {
        "model": args.model,
        "format": Renderer.for_tokenizer(engine.tokenizer, args.prompt_format).style,
        "pairs": int(sum(labels)),
        "date": datetime.date.today().isoformat(),
    }
    for rater in bt.RATERS:
        started = time.perf_counter()
        scores = bt.rate(engine, control, rater, args.prompt_format)
        seconds = time.perf_counter() - started
        figures = {"curation": "curation"} | (
            {"uncalibrated": "curation_uncalibrated"} if rater == "rubric" else {"pmi": "curation_pmi"}
        )
        for name, key in figures.items():
            matched = [s[key] for s, label in zip(scores, labels) if label]
            shuffled = [s[key] for s, label in zip(scores, labels) if not label]
            results[f"{rater}/{name}"] = {
                "auc": round(bt.rater_auc(matched, shuffled), 3),
                "interval_90": _interval(matched, shuffled),
                "matched_mean": round(statistics.fmean(matched), 4),
                "shuffled_mean": round(statistics.fmean(shuffled), 4),
                "readable": sum(1 for s in scores if s["curation"] > 0),
            }
        results[f"{rater}/seconds_per_pair"] = round(seconds / len(control), 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
