"""The hf engine and the vllm engine (vLLM's CPU build) in one run, on the same prompts.

    python -m benchmarks.engines [--model builtin:smollm2-135m] [--prompts 32] [--max-new-tokens 128]
                                 [--threads 1] [--no-stages] [--quick]

1. Throughput: the same Self-Instruct instruction-generation prompts (built from the seed tasks, as
   benchmarks/hf_engine.py builds them), greedy, through the hf engine (float32, batches of
   generation.batch_size: today's default engine) and the vllm engine in bfloat16 (its CPU default,
   dtype auto) and float32. Per engine: start-up seconds (engine + model), tokens/s (generated tokens up
   to EOS), the ratio to hf, and how many greedy outputs are hf's exactly.
2. Stages (off with --no-stages): the generation-heavy part of one round of the default run
   (configs/local.yaml), through the same service code the replicas run: engine start, Self-Instruct
   instructions (requests of generation.pool_refresh_prompts prompts), instances for the tasks the hf
   engine wrote (the same work for both engines), evaluation of the dev split with NLL, and a new
   round's checkpoint loaded (vllm on CPU: a new engine). Seconds per stage and their sum.

Every engine computes on --threads threads (1: what each Serve replica gets, by serve.replica_num_cpus
for hf and generation.vllm_cpu_threads for vllm). Without vLLM installed (the main venv), only hf runs
and the vllm figures are null; `.venv-vllm/bin/python -m benchmarks.engines` runs both. One JSON line on
stdout. --quick: the built-in tiny Llama, 4 prompts of 8 tokens, tiny stages; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from datetime import date

from ray_jobs.seed_split import split_by_task
from services.common.config import load_config
from services.common.engines import SamplingParams, create_engine
from services.common.formats import load_seed_tasks
from services.common.models import resolve_model
from services.evaluator.service import EvaluatorService
from services.generator import self_instruct as si
from services.generator.service import GeneratorService, RunContext

from . import parse_args

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # vLLM logs to stdout: the figures alone go there
HAS_VLLM = importlib.util.find_spec("vllm") is not None
QUICK = {"model": "builtin:tiny-llama", "prompts": 4, "max_new_tokens": 8}


def _engine(name: str, args, dtype: str = "auto"):
    config = load_config(args.config)
    cache = config.model.builtin_cache_dir
    if name == "hf":
        return create_engine("hf", cache_dir=cache, batch_size=config.generation.batch_size, torch_threads=args.threads)
    return create_engine("vllm", cache_dir=cache, dtype=dtype, cpu_threads=args.threads)


def _release(engine) -> None:
    if hasattr(engine, "close"):
        engine.close()
    gc.collect()


def throughput(name: str, args, prompts: list[str], dtype: str = "auto") -> tuple[dict, list[str]]:
    started = time.perf_counter()
    engine = _engine(name, args, dtype)
    engine.load(args.model)
    start_s = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    engine.generate(prompts[:2], params)  # warm-up
    started = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(c.num_tokens for c in out)
    _release(engine)
    figures = {"start_s": round(start_s, 1), "seconds": round(seconds, 2), "tokens": tokens}
    figures["tokens_per_s"] = round(tokens / seconds, 1)
    return figures, [c.text for c in out]


def stages(name: str, args, workload: dict, instance_tasks: list | None) -> tuple[dict, list]:
    """One round's generation-heavy stages with `name`'s engine, as the replicas run them."""
    config = workload["config"]
    g, seed = config.generation, config.seed
    times: dict = {}
    started = time.perf_counter()
    engine = _engine(name, args)
    engine.load(args.model)
    times["start_s"] = time.perf_counter() - started

    generator, ctx = GeneratorService(engine), RunContext("bench", 1)
    sampling = SamplingParams(g.temperature, g.top_p, g.max_new_tokens, seed, presence_penalty=g.presence_penalty)
    started, written = time.perf_counter(), []
    # as the driver sends them: requests of pool_refresh_prompts, later prompts seeing earlier tasks
    for first in range(0, workload["num_prompts"], g.pool_refresh_prompts):
        count = min(g.pool_refresh_prompts, workload["num_prompts"] - first)
        human, n_human, n_machine = workload["train"], g.num_human_in_context, g.num_machine_in_context
        batch = generator.generate_instructions(
            ctx, args.model, human, written, count, sampling, n_human, n_machine, first_prompt_index=first
        )
        written += batch.tasks
    times["instructions_s"] = time.perf_counter() - started

    tasks = (instance_tasks if instance_tasks is not None else written)[: workload["max_instance_tasks"]]
    instance_sampling = SamplingParams(
        g.instance_temperature, g.top_p, g.instance_max_new_tokens, seed, presence_penalty=g.instance_presence_penalty
    )
    started = time.perf_counter()
    generator.generate_instances(ctx, args.model, tasks, workload["train"], g.num_demonstrations, instance_sampling)
    times["instances_s"] = time.perf_counter() - started

    started = time.perf_counter()
    evaluator = EvaluatorService(
        engine, config.model.prompt_format, config.training.max_seq_len, seed_tag=config.backtranslation.seed_tag
    )
    e = config.evaluation
    eval_sampling = SamplingParams(0.0, 1.0, workload["eval_max_new_tokens"], 0)
    evaluator.evaluate(args.model, workload["dev"], e.max_instances_per_task, eval_sampling, with_nll=e.with_nll)
    times["evaluate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    engine.load(workload["next_model"])  # the next round's checkpoint (here: the same weights, elsewhere)
    engine.generate(["Hi"], SamplingParams(temperature=0.0, max_new_tokens=1))
    times["new_model_s"] = time.perf_counter() - started
    _release(engine)
    figures = {k: round(v, 1) for k, v in times.items()}
    figures["total_s"] = round(sum(times.values()), 1)
    return figures, written


def _workload(args, tmp: str) -> dict:
    config = load_config(args.config)
    s, e = config.seeds, config.evaluation
    train, heldout = split_by_task(load_seed_tasks(), s.heldout_fraction, s.split_seed)
    dev, _ = split_by_task(heldout, e.test_fraction, s.split_seed + 1) if e.test_fraction else (heldout, [])
    next_model = os.path.join(tmp, "round-001-model")
    shutil.copytree(resolve_model(args.model, config.model.builtin_cache_dir), next_model)
    quick = args.quick
    return {
        "config": config,
        "train": train,
        "dev": dev[:2] if quick else dev,
        "num_prompts": 2 if quick else config.generation.num_prompts,
        "max_instance_tasks": 2 if quick else 1000,
        "eval_max_new_tokens": 8 if quick else e.max_new_tokens,
        "next_model": next_model,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--config", default="configs/local.yaml", help="the run whose stages are timed")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-stages", action="store_true")
    args = parse_args(parser, quick=QUICK)
    seeds, rng = load_seed_tasks(), random.Random(0)
    prompts = [si.build_instruction_prompt(seeds, [], rng).text for _ in range(args.prompts)]

    result: dict = {"date": date.today().isoformat(), "model": args.model, "prompts": args.prompts}
    result.update(max_new_tokens=args.max_new_tokens, threads=args.threads, cpus=os.cpu_count())
    result["load_average_at_start"] = round(os.getloadavg()[0], 2)
    hf, hf_texts = throughput("hf", args, prompts)
    result["hf_fp32"] = hf
    # quick: one vLLM engine start (float32) instead of two
    for key, dtype in (("vllm_fp32", "float32"),) if args.quick else (("vllm_bf16", "auto"), ("vllm_fp32", "float32")):
        if not HAS_VLLM:
            result[key] = None
            continue
        figures, texts = throughput("vllm", args, prompts, dtype)
        figures["ratio_to_hf"] = round(figures["tokens_per_s"] / hf["tokens_per_s"], 2)
        figures["greedy_equal_to_hf"] = f"{sum(a == b for a, b in zip(texts, hf_texts))}/{len(texts)}"
        result[key] = figures

    if not args.no_stages:
        with tempfile.TemporaryDirectory() as tmp:
            workload = _workload(args, tmp)
            result["stages"] = {"config": args.config, "dev_tasks": len(workload["dev"])}
            result["stages"]["hf"], written = stages("hf", args, workload, None)
            result["stages"]["vllm"] = stages("vllm", args, workload, written)[0] if HAS_VLLM else None
            result["stages"]["instance_tasks"] = min(len(written), workload["max_instance_tasks"])
            if HAS_VLLM:
                ratio = result["stages"]["hf"]["total_s"] / result["stages"]["vllm"]["total_s"]
                result["stages"]["hf_over_vllm"] = round(ratio, 2)
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
