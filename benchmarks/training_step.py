"""What a training step costs, by recipe, on the data the default run trains on, in one run.

The control's training mix (each seed train task's first instance, one per label first, as
training.seed_instances_per_task 1 gives), rendered and packed exactly as the trainer does
(services/trainer/train_loop.py), LoRA as configs/local.yaml sets it. Each recipe runs the same
batches, forward + backward + optimizer step; figures are real (non-pad) tokens per second:
- full logits, fp32: the model's own loss, every position through the vocabulary head;
- response-only logits, fp32: services/trainer/loss.py, the head only on the response tokens;
- response-only logits, bf16 autocast (AMX on recent Xeons).

    python -m benchmarks.training_step [--model builtin:smollm2-135m] [--steps 6] [--threads 2]
    python -m benchmarks.training_step --quick      # the tiny Llama, 2 steps (CI)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from services.common.config import ReinstructConfig, load_config
from services.common.formats import load_seed_tasks
from services.common.models import load_model
from services.common.rendering import Renderer, tokenize
from services.evaluator.split import split_by_task
from services.trainer.loss import TrainingLoss
from services.trainer.train_loop import _apply_lora, _batches

from . import parse_args

RECIPES = (
    ("full_logits_fp32", False, None),
    ("response_only_fp32", True, None),
    ("response_only_bf16", True, torch.bfloat16),
)


def _training_features(config: ReinstructConfig, tokenizer) -> list[dict]:
    seeds = load_seed_tasks(config.seeds.path)
    train, _ = split_by_task(seeds, config.seeds.heldout_fraction, config.seeds.split_seed)
    cap = config.training.seed_instances_per_task or 1
    tasks = [replace(t, instances=t.instances[:cap]) for t in train]
    renderer = Renderer.for_tokenizer(tokenizer, config.model.prompt_format)
    examples = renderer.render_all(tasks, config.seed, config.training.fewshot_fraction, config.training.fewshot_k)
    return [tokenize(e, tokenizer, config.training.max_seq_len, False) for e in examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--config", default="configs/local.yaml", help="training settings (batch, length, LoRA)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parse_args(parser, quick={"model": "builtin:tiny-llama", "steps": 2})
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    training = config.training.model_dump()
    model, tokenizer = load_model(args.model, cache_dir=config.model.builtin_cache_dir)
    features = _training_features(config, tokenizer)
    packs, collate_fn, per_step, share = _batches(features, training, False, tokenizer.pad_token_id)
    groups = [packs[i : i + per_step] for i in range(0, len(packs), per_step)]
    batches = [(collate_fn(group), sum(len(p["input_ids"]) for p in group)) for group in groups]
    if training["lora"]["enabled"]:
        model = _apply_lora(model, training)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    result = {"model": args.model, "examples": len(features), "packs_per_step": per_step, "real_token_share": share}
    for name, fast, dtype in RECIPES:
        loss_of = TrainingLoss(model, encoder_decoder=False, sharded=False) if fast else None
        tokens, seconds = 0, 0.0
        for step in range(args.steps + 1):
            batch, real_tokens = batches[step % len(batches)]
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = loss_of(batch) if fast else model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first step warms up (and checks the fast loss against the model's)
                seconds += time.perf_counter() - started
                tokens += real_tokens
        result[name] = {"tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / args.steps, 2)}
        if fast and not loss_of.fast:
            result[name]["fell_back"] = loss_of.mismatch
    base = result["full_logits_fp32"]["tokens_per_s"]
    for name, _, _ in RECIPES[1:]:
        result[name]["speedup"] = round(result[name]["tokens_per_s"] / base, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
