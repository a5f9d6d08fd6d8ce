"""What the promotion gate can see, measured on a run's own records.

For every pair of models a run evaluated on dev (model 0, the seeds-only control, each round's
candidate), the paired per-task differences of each metric give:
- the minimum detectable effect (MDE) at 80% power for the gate's one-sided test, per metric and
  interval method — the smallest true gain the gate would promote on this many tasks;
- the coverage of each interval method at this n, by simulation: tasks drawn with replacement from
  the centered differences (a population whose true mean is 0), how often the interval holds 0.
  A nominal 90% interval that covers 81% promotes noise twice as often as it says.
And, where the run recorded one, the self-curation rater's AUC per round.

    python -m benchmarks.gate_power --run runs/demo     # a finished run (make run)
    python -m benchmarks.gate_power --quick             # synthetic records, seconds (CI)
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from ray_jobs.manifest import Evaluated, Filtered, rounds_of
from services.common.store import RunStore
from services.evaluator.intervals import METHODS, mean_interval

METRICS = ("nll", "score")


def _evaluations(manifest: dict) -> dict[str, Evaluated]:
    out = {}
    for r in rounds_of(manifest):
        for stage, name in (("evaluate", f"round {r.index}"), ("control_evaluate", "control")):
            if (e := r.get(stage, Evaluated)) is not None and e.task_metrics:
                out["model 0" if name == "round 0" else name] = e
    return out


def _differences(a: Evaluated, b: Evaluated, metric: str) -> dict[str, float]:
    sign = -1.0 if metric == "nll" else 1.0  # a gain: positive when b is better
    shared = sorted(set(a.task_metrics) & set(b.task_metrics))
    return {t: sign * (b.task_metrics[t][metric] - a.task_metrics[t][metric]) for t in shared}


def coverage(differences: dict[str, float], method: str, confidence: float, trials: int, seed: int = 0) -> float:
    """Share of intervals, over samples of the run's size from the centered differences, that hold 0."""
    values = np.array(list(differences.values()))
    centered = values - values.mean()
    rng = np.random.default_rng(seed)
    held = 0
    for trial in range(trials):
        sample = rng.choice(centered, size=values.size, replace=True)
        interval = mean_interval(
            {f"t{i}": v for i, v in enumerate(sample)},
            method=method,
            confidence=confidence,
            resamples=500,
            seed=trial,
        )
        held += interval.low <= 0.0 <= interval.high
    return held / trials


def measure(evaluations: dict[str, Evaluated], confidence: float, trials: int) -> list[dict]:
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(evaluations.items(), 2):
        for metric in METRICS:
            diffs = _differences(a, b, metric)
            if len(diffs) < 3 or not np.ptp(list(diffs.values())):
                continue
            strata = {t: a.task_metrics[t]["category"] for t in diffs}
            for method in METHODS:
                interval = mean_interval(diffs, method=method, confidence=confidence, resamples=2000, strata=strata)
                rows.append(
                    {
                        "pair": f"{name_b} vs {name_a}",
                        "metric": metric,
                        "method": method,
                        "tasks": len(diffs),
                        "gain": interval.estimate,
                        "low": interval.low,
                        "high": interval.high,
                        "mde": interval.minimum_detectable,
                        "coverage": coverage(diffs, method, confidence, trials),
                    }
                )
    return rows


def _synthetic(seed: int = 0, tasks: int = 24) -> dict[str, Evaluated]:
    rng = np.random.default_rng(seed)
    base_nll = rng.uniform(1.5, 3.0, tasks)
    out = {}
    for name, shift in (("model 0", 0.0), ("control", 0.2), ("round 1", 0.25)):
        out[name] = Evaluated(
            model_uri=name,
            task_metrics={
                f"t{i}": {
                    "nll": float(base_nll[i] - shift + rng.normal(0, 0.1)),
                    "score": float(np.clip(0.3 + shift / 2 + rng.normal(0, 0.2), 0, 1)),
                    "category": "classification" if i % 4 == 0 else "generation",
                }
                for i in range(tasks)
            },
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a run's folder in the store (e.g. runs/demo)")
    parser.add_argument("--confidence", type=float, default=None, help="default: the run's evaluation.confidence")
    parser.add_argument("--trials", type=int, default=400, help="coverage simulation samples per row")
    parser.add_argument("--quick", action="store_true", help="synthetic records, few trials (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        evaluations, confidence, trials, aucs = _synthetic(), args.confidence or 0.9, 20, {}
    else:
        if not args.run:
            parser.error("--run is needed (or --quick)")
        root, run_id = args.run.rstrip("/").rsplit("/", 1) if "/" in args.run else (".", args.run)
        manifest = RunStore(root).load_manifest(run_id)
        evaluations = _evaluations(manifest)
        confidence = args.confidence or manifest.get("config", {}).get("evaluation", {}).get("confidence", 0.9)
        trials = args.trials
        aucs = {
            r.index: auc
            for r in rounds_of(manifest)
            if (f := r.get("filter_augmented", Filtered)) is not None and (auc := getattr(f, "rater_auc", None))
        }
    print(f"{'pair':<22} {'metric':<6} {'method':<10} {'tasks':>5} {'gain':>8} {'interval':>20} {'MDE':>7} cover")
    for row in measure(evaluations, confidence, trials):
        print(
            f"{row['pair']:<22} {row['metric']:<6} {row['method']:<10} {row['tasks']:>5} {row['gain']:>+8.4f} "
            f"[{row['low']:+.4f}, {row['high']:+.4f}] {row['mde']:>7.4f} {row['coverage']:.0%}"
        )
    for k, auc in aucs.items():
        print(f"round {k}: self-curation rater AUC {auc:.3f}")
    print(f"(nominal coverage {confidence:.0%}; MDE at 80% power, one-sided {(1 - confidence) / 2:.0%})")


if __name__ == "__main__":
    main()
