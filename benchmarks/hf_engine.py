"""The hf engine's batched generation against one prompt at a time, same prompts, one run.

    python -m benchmarks.hf_engine [--model builtin:tiny-llama] [--prompts 32] [--batch-size 16]

Prompts are real Self-Instruct instruction-generation prompts built from the seed tasks; sampling
is seeded; tokens/s counts generated tokens (up to EOS)."""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from services.common.engines import SamplingParams, create_engine
from services.common.formats import load_seed_tasks
from services.generator import self_instruct as si

from . import parse_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parse_args(parser, quick={"prompts": 4, "batch_size": 2, "max_new_tokens": 8})
    torch.set_num_threads(torch.get_num_threads())
    seeds = load_seed_tasks()
    rng = random.Random(0)
    prompts = [si.build_instruction_prompt(seeds, [], rng).text for _ in range(args.prompts)]
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, seed=0)
    results = {}
    for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
        engine = create_engine("hf", batch_size=batch_size)
        engine.load(args.model)
        engine.generate(prompts[:2], params)  # warm-up
        started = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = sum(c.num_tokens for c in out)
        results[name] = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    results["speedup"] = round(results["batched"]["tokens_per_s"] / results["one_at_a_time"]["tokens_per_s"], 2)
    results.update(model=args.model, prompts=args.prompts, batch_size=args.batch_size, threads=torch.get_num_threads())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
