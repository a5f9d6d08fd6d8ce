"""ROUGE-L novelty filter: reinstruct's NoveltyIndex against rouge-score, in one run, one core.

    python -m benchmarks.rouge_filter [--pool 10000] [--candidates 1000] [--reference-candidates 20]

Instructions are synthesized from the seed instructions by word edits (deterministic), so pools of
100,000 look like real instruction pools: shared verbs and frames, varied overlap. rouge-score is
timed on the first --reference-candidates candidates (its cost per candidate is flat, so the total is
extrapolated) and both must make identical decisions and identical F values on them.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from rouge_score import rouge_scorer

from services.common.formats import load_seed_tasks
from services.common.rouge import NoveltyIndex

from . import parse_args


def synthetic_instructions(n: int, seed: int, base: list[str] | None = None, edit_rate: float = 0.5) -> list[str]:
    rng = random.Random(seed)
    seeds = base or [t.instruction for t in load_seed_tasks()]
    vocabulary = sorted({w for s in seeds for w in s.split()})
    out = []
    for _ in range(n):
        words = rng.choice(seeds).split()
        for i in range(len(words)):
            if rng.random() < edit_rate:
                words[i] = rng.choice(vocabulary)
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(vocabulary))
        out.append(" ".join(words))
    return out


def reference_filter(pool: list[str], candidates: list[str], threshold: float) -> list[tuple[bool, float]]:
    """Self-Instruct's loop with rouge-score: every candidate against every pooled instruction."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    grown, out = list(pool), []
    for text in candidates:
        scores = [scorer.score(other, text)["rougeL"].fmeasure for other in grown]
        best = max(scores) if scores else 0.0
        keep = best < threshold
        if keep:
            grown.append(text)
        out.append((keep, best))
    return out


def run(pool_size: int, n_candidates: int, n_reference: int, threshold: float = 0.7) -> dict:
    pool = synthetic_instructions(pool_size, seed=1)
    # Half the candidates are light edits of pool entries (near duplicates), half heavier edits.
    candidates = synthetic_instructions(n_candidates // 2, seed=2, base=pool[:2000], edit_rate=0.15)
    candidates += synthetic_instructions(n_candidates - len(candidates), seed=3)
    random.Random(4).shuffle(candidates)

    started = time.perf_counter()
    index = NoveltyIndex(pool)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    ours = index.filter_in_order(candidates, threshold)
    ours_s = time.perf_counter() - started

    result = {
        "pool": pool_size,
        "candidates": n_candidates,
        "index_build_s": round(build_s, 3),
        "ours_s": round(ours_s, 3),
        "ours_s_per_1000": round(ours_s * 1000 / n_candidates, 4),
        "kept": sum(k for k, _, _ in ours),
    }
    if n_reference:
        started = time.perf_counter()
        reference = reference_filter(pool, candidates[:n_reference], threshold)
        reference_s = time.perf_counter() - started
        mine = NoveltyIndex(pool).filter_in_order(candidates[:n_reference], threshold)
        assert [k for k, _ in reference] == [k for k, _, _ in mine], "decisions differ from rouge-score"
        assert [f for _, f in reference] == [f for _, f, _ in mine], "F values differ from rouge-score"
        extrapolated = reference_s / n_reference * n_candidates
        result.update(
            reference_checked=n_reference,
            reference_s_per_1000=round(extrapolated, 1),
            speedup=round(extrapolated / ours_s, 1),
            identical_decisions=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--reference-candidates", type=int, default=20)
    parser.add_argument("--reference-pool", type=int, default=10000, help="pool size compared with rouge-score")
    args = parse_args(
        parser, quick={"pool": [1000], "candidates": 50, "reference_candidates": 5, "reference_pool": 1000}
    )
    rows = []
    for size in args.pool:
        rows.append(run(size, args.candidates, args.reference_candidates if size == args.reference_pool else 0))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
