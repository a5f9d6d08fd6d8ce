"""What a training step costs, by recipe and by OpenMP wait policy, on the data the default run
trains on, in one run.

The control's training mix (each seed train task's first instance, as training.seed_instances_per_task
1 gives), rendered and packed exactly as the trainer does (services/trainer/train_loop.py), LoRA as
configs/local.yaml sets it. Every measurement is forward + backward + optimizer step on the same
batches, a fresh model each, in a process of its own; figures are real (non-pad) tokens per second.

1. Recipes (OMP_WAIT_POLICY=PASSIVE, nothing else running), one lever at a time:
   - full logits, fp32, LoRA dropout 0.05 (the peft-style default): every position through the head;
   - response-only logits (services/trainer/loss.py): the head only on the response tokens;
   - no LoRA dropout: on CPU, drawing a dropout mask for every LoRA layer's input is a quarter of a step;
   - bf16 autocast (AMX on recent Xeons).
2. Wait policy (training.omp_wait_policy) with the last recipe: ACTIVE (libgomp spins at barriers)
   against PASSIVE, alone and beside a background process that keeps --load of one core busy in short
   bursts, as Ray's own processes and idle Serve replicas do beside a training worker on a small node.

    python -m benchmarks.training_step [--model builtin:smollm2-135m] [--steps 6] [--threads 2] [--load 0.3]
    python -m benchmarks.training_step --quick      # the tiny Llama, 1 step (CI)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import replace

from . import parse_args

# name: (response-only logits, precision, LoRA dropout); the first is the recipe before these levers
RECIPES = {
    "full_logits_fp32_dropout_0.05": (False, "fp32", 0.05),
    "response_only_fp32_dropout_0.05": (True, "fp32", 0.05),
    "response_only_fp32_no_dropout": (True, "fp32", 0.0),
    "response_only_bf16_no_dropout": (True, "bf16", 0.0),
}


def _features(config, tokenizer) -> list[dict]:
    from ray_jobs.seed_split import split_by_task
    from services.common.formats import load_seed_tasks
    from services.common.rendering import Renderer, tokenize

    train, _ = split_by_task(load_seed_tasks(config.seeds.path), config.seeds.heldout_fraction, config.seeds.split_seed)
    cap = config.training.seed_instances_per_task or 1
    tasks = [replace(t, instances=t.instances[:cap]) for t in train]
    renderer = Renderer.for_tokenizer(tokenizer, config.model.prompt_format)
    examples = renderer.render_all(tasks, config.seed, config.training.fewshot_fraction, config.training.fewshot_k)
    return [tokenize(e, tokenizer, config.training.max_seq_len, False) for e in examples]


def measure(model_id: str, config_path: str, recipe: str, steps: int, threads: int) -> dict:
    """One recipe in this process: tokens/s over `steps` steps after one warm-up step."""
    import torch

    from services.common.config import load_config
    from services.common.models import load_model
    from services.trainer.loss import TrainingLoss
    from services.trainer.train_loop import _apply_lora, _batches

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = load_config(config_path)
    fast, precision, dropout = RECIPES[recipe]
    training = config.training.model_copy(update={"lora": config.training.lora.model_copy(update={"dropout": dropout})})
    model, tokenizer = load_model(model_id, cache_dir=config.model.builtin_cache_dir)
    packs, collate_fn, per_step, share = _batches(_features(config, tokenizer), training, False, tokenizer.pad_token_id)
    groups = [packs[i : i + per_step] for i in range(0, len(packs), per_step)]
    batches = [(collate_fn(group), sum(len(p["input_ids"]) for p in group)) for group in groups]
    if training.lora.enabled:
        model = _apply_lora(model, training.lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    checked = TrainingLoss(model, encoder_decoder=False, sharded=False)
    loss_of = checked if fast else (lambda batch: model(**batch).loss)
    tokens, seconds = 0, 0.0
    for step in range(steps + 1):
        batch, real_tokens = batches[step % len(batches)]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up (and checks the fast loss against the model's)
            seconds += time.perf_counter() - started
            tokens += real_tokens
    return {
        "tokens_per_s": round(tokens / seconds, 1),
        "s_per_step": round(seconds / steps, 2),
        "packs_per_step": per_step,
        "real_token_share": round(share, 4),
        "response_only_logits": fast and checked.fast,
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


def _busy(share: float, stop) -> None:
    """Keeps `share` of one core busy in 10 ms bursts, like the many small processes beside a worker."""
    burst = 0.01
    while not stop.is_set():
        ends = time.perf_counter() + burst
        while time.perf_counter() < ends:
            pass
        time.sleep(burst * (1 - share) / share)


def _child(args, recipe: str, policy: str, load: float) -> dict:
    stop = multiprocessing.Event()
    background = multiprocessing.Process(target=_busy, args=(load, stop), daemon=True) if load else None
    if background:
        background.start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.training_step", "--child", recipe, "--model", args.model]
            + ["--config", args.config, "--steps", str(args.steps), "--threads", str(args.threads)],
            env={**os.environ, "OMP_WAIT_POLICY": policy},
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        stop.set()
        if background:
            background.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--config", default="configs/local.yaml", help="training settings (batch, length, LoRA)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.3, help="share of one core the background load keeps busy")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parse_args(parser, quick={"model": "builtin:tiny-llama", "steps": 1})
    if args.steps < 1 or not 0 < args.load < 1:
        parser.error("--steps must be at least 1 and --load between 0 and 1")
    if args.child:
        print(json.dumps(measure(args.model, args.config, args.child, args.steps, args.threads)))
        return
    result = {"model": args.model, "threads": args.threads, "steps": args.steps, "recipes": {}, "wait_policy": {}}
    for recipe in RECIPES:
        result["recipes"][recipe] = _child(args, recipe, "PASSIVE", 0.0)
    base = result["recipes"][next(iter(RECIPES))]["tokens_per_s"]
    for figures in result["recipes"].values():
        figures["speedup"] = round(figures["tokens_per_s"] / base, 2)
    recipe = list(RECIPES)[-1]
    for load in (0.0, args.load):
        row = {policy: _child(args, recipe, policy, load)["tokens_per_s"] for policy in ("ACTIVE", "PASSIVE")}
        row["passive_over_active"] = round(row["PASSIVE"] / row["ACTIVE"], 2)
        result["wait_policy"][f"background_load_{load:g}"] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
