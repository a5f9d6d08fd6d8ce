"""Packing against plain padded batches on the same data: share of real (non-pad) tokens, and
training tokens/s (real tokens per second of forward + backward + step), in one run.

    python -m benchmarks.packing [--max-seq-len 384] [--batch-size 16] [--steps 30]

Data: the round-0 training mix of the embedded default (seed tasks + Self-Instruct meta-tasks + curation
meta-tasks), tokenized for the built-in tiny Llama."""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from ray_jobs.meta_tasks import build_meta_tasks
from ray_jobs.seed_split import split_by_task
from services.common.formats import load_seed_tasks
from services.common.models import load_model
from services.common.rendering import Renderer, tokenize
from services.generator.backtranslation import curation_meta_tasks
from services.trainer.formatting import collate, collate_packed, pack

from . import parse_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parse_args(parser, quick={"max_seq_len": 128, "batch_size": 4, "steps": 2})
    train, _ = split_by_task(load_seed_tasks(), 0.2, 0)
    tasks = train + build_meta_tasks(train, [], seed=0) + curation_meta_tasks(train, seed=0)
    model, tokenizer = load_model("builtin:tiny-llama")
    features = [tokenize(e, tokenizer, args.max_seq_len, False) for e in Renderer().render_all(tasks, 0)]
    random.Random(0).shuffle(features)
    mean_len = sum(len(f["input_ids"]) for f in features) / len(features)

    padded = [features[i : i + args.batch_size] for i in range(0, len(features), args.batch_size)]
    packs = pack(features, args.max_seq_len)
    per_batch = max(1, round(args.batch_size * mean_len / args.max_seq_len))
    packed = [packs[i : i + per_batch] for i in range(0, len(packs), per_batch)]

    def share(batches, key="input_ids") -> float:
        real = sum(len(x[key]) for b in batches for x in b)
        total = sum(len(b) * max(len(x[key]) for x in b) for b in batches)
        return real / total

    def throughput(batches, collate_fn) -> float:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        real, seconds = 0, 0.0
        for step in range(args.steps + 2):
            batch = batches[step % len(batches)]
            tensors = collate_fn(batch)
            started = time.perf_counter()
            model(**tensors).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:  # the first steps warm up
                seconds += time.perf_counter() - started
                real += sum(len(x["input_ids"]) for x in batch)
        return real / seconds

    result = {
        "examples": len(features),
        "mean_tokens_per_example": round(mean_len, 1),
        "max_seq_len": args.max_seq_len,
        "padded": {
            "sequences": len(features),
            "batches": len(padded),
            "real_token_share": round(share(padded), 4),
            "real_tokens_per_s": round(throughput(padded, lambda b: collate(b, tokenizer.pad_token_id)), 1),
        },
        "packed": {
            "sequences": len(packs),
            "batches": len(packed),
            "real_token_share": round(share(packed), 4),
            "real_tokens_per_s": round(throughput(packed, lambda b: collate_packed(b, tokenizer.pad_token_id)), 1),
        },
    }
    result["speedup"] = round(result["packed"]["real_tokens_per_s"] / result["padded"]["real_tokens_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
