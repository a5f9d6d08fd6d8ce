"""Does adding replicas make a stage faster? The same stage, sent the way the loop driver sends it
(ray_jobs.fanout: shards, at most max_in_flight at once, Serve spreading them), with 1 and then 2
replicas of one app, through Serve's gRPC proxy on loopback.

    python -m benchmarks.scale_out [--prompts 32] [--prompts-per-shard 2] [--max-new-tokens 128] [--quick]

1. Instruction generation with the real default model (builtin:smollm2-135m), one torch thread per
   generator replica, the same prompts and seed both times.
2. The filter's parallel part (ScoreNovelty: candidates against the pool, in shards) with 1 and 2
   filter replicas, then its sequential part (FilterTasks with those scores), against filtering
   in one FilterTasks request as before.

Starts its own local Ray (ports 9700/8700). The last line is `speed-up 1.xx`: generation's wall time
with 1 replica over that with 2. --quick: the built-in tiny Llama, a few prompts and candidates (about
a minute, mostly Ray starting and replicas loading).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from . import parse_args

PORTS = {"grpc_port": 9700, "http_port": 8700}
# A fresh store: no other request holds a shard's part, so ABORTED is a failure to see, not to wait out.
BUSY_WAIT_S = 0.0
QUICK = {
    "model": "builtin:tiny-llama",
    "prompts": 4,  # 2 generation shards
    "max_new_tokens": 8,
    "pool": 500,
    "candidates": 40,
    "candidates_per_shard": 10,  # 4 filter shards: 2 replicas are warmed, and the filter still splits
}


def _deploy(app_name: str, build_app, settings: dict) -> None:
    from ray import serve

    serve.run(build_app({"settings": settings}), name=app_name, route_prefix=f"/{app_name}")
    deadline = time.time() + 600
    while True:  # serve.run returns when the app is RUNNING; new replicas of a redeploy may still start
        status = serve.status().applications[app_name].deployments
        if all(d.replica_states.get("RUNNING", 0) >= _replicas(settings, app_name) for d in status.values()):
            break
        if time.time() > deadline:
            raise TimeoutError(f"{app_name}: replicas not running: {status}")
        time.sleep(0.5)


def _replicas(settings: dict, app_name: str) -> int:
    return settings["serve"][app_name]["replicas"]


def _settings(root: str, model: str | None, replicas: int) -> dict:
    from services.common.config import parse_config

    return parse_config(
        {
            "model": {"base": model} if model else {},
            "store": {"root": root},
            "serve": {
                **PORTS,
                "torch_threads": 1,
                "replica_num_cpus": 1,
                "max_ongoing_requests": 4,
                "generator": {"replicas": replicas},
                "filter": {"replicas": replicas},
            },
        }
    ).model_dump()


def _generation(args, clients, store, settings: dict, label: str) -> float:
    from ray_jobs.fanout import ShardedStage
    from services.api import common_pb2, generator_pb2
    from services.common.convert import uri_source
    from services.common.formats import load_seed_tasks

    seeds_uri = store.dataset_uri("bench", 0, "seeds")
    store.write_tasks(seeds_uri, load_seed_tasks())
    g = settings["generation"]
    key = store.claim_run("bench")  # the run's key, as a driver holds it

    def request(first: int, count: int, output_uri: str = "") -> generator_pb2.GenerateInstructionsRequest:
        return generator_pb2.GenerateInstructionsRequest(
            context=common_pb2.RunContext(run_id="bench", round=1, run_key=key),
            model_uri=settings["model"]["base"],
            seed_tasks=uri_source(seeds_uri),
            num_prompts=count,
            num_human_in_context=8,
            num_machine_in_context=0,
            sampling=common_pb2.Sampling(
                temperature=g["temperature"],
                top_p=g["top_p"],
                max_new_tokens=args.max_new_tokens,
                seed=7,
                presence_penalty=g["presence_penalty"],
            ),
            first_prompt_index=first,
            output_uri=output_uri,
        )

    # warm-up: as many concurrent one-prompt requests as replicas x 2, so every replica loads the model
    from concurrent.futures import ThreadPoolExecutor

    replicas = settings["serve"]["generator"]["replicas"]
    with ThreadPoolExecutor(2 * replicas) as pool:
        list(pool.map(lambda i: clients.generate_instructions(request(10_000 + i, 1)), range(2 * replicas)))

    sharded = ShardedStage(store, "bench", 1, f"scale-out-{label}", args.max_in_flight, BUSY_WAIT_S)
    shards = sharded.shards(list(range(args.prompts)), args.prompts_per_shard)
    started = time.perf_counter()
    responses = sharded.run(
        shards,
        lambda shard: clients.generate_instructions(request(shard.items[0], len(shard.items), shard.output_uri)),
        generator_pb2.GenerateInstructionsResponse,
    )
    elapsed = time.perf_counter() - started
    written = sum(r.output.count for r in responses)
    print(f"generation   {replicas} replica(s): {elapsed:7.1f} s  ({args.prompts} prompts, {written} instructions)")
    return elapsed


def _filter(args, clients, store, replicas: int, label: str) -> tuple[float, float, list]:
    from ray_jobs.fanout import ShardedStage
    from services.api import common_pb2, filter_pb2
    from services.common.convert import uri_source
    from services.common.records import TaskRecord

    from .rouge_filter import synthetic_instructions

    ctx = common_pb2.RunContext(run_id="bench", round=2, run_key=store.claim_run("bench"))
    pool_uri, candidates_uri = store.dataset_uri("bench", 2, "pool"), store.dataset_uri("bench", 2, "candidates")
    if not store.exists(pool_uri):
        pool = synthetic_instructions(args.pool, seed=1)
        store.write_tasks(pool_uri, [TaskRecord(id=f"p{i}", instruction=t) for i, t in enumerate(pool)])
        texts = synthetic_instructions(args.candidates, seed=2)
        store.write_tasks(candidates_uri, [TaskRecord(id=f"c{i}", instruction=t) for i, t in enumerate(texts)])
    candidates = store.read_tasks(candidates_uri)
    sharded = ShardedStage(store, "bench", 2, f"novelty-{label}", args.max_in_flight, BUSY_WAIT_S)
    shards = sharded.shards(candidates, args.candidates_per_shard, write_inputs=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2 * replicas) as warm:  # every replica reads and indexes the pool once
        list(
            warm.map(
                lambda shard: clients.score_novelty(
                    filter_pb2.ScoreNoveltyRequest(
                        context=ctx, candidates=uri_source(shard.input_uri), pool=uri_source(pool_uri)
                    )
                ),
                shards[: 2 * replicas],
            )
        )
    started = time.perf_counter()
    responses = sharded.run(
        shards,
        lambda shard: clients.score_novelty(
            filter_pb2.ScoreNoveltyRequest(
                context=ctx, candidates=uri_source(shard.input_uri), pool=uri_source(pool_uri)
            )
        ),
        filter_pb2.ScoreNoveltyResponse,
    )
    parallel = time.perf_counter() - started
    scores = [s for r in responses for s in r.scores]
    started = time.perf_counter()
    decided = clients.filter_tasks(
        filter_pb2.FilterTasksRequest(
            context=ctx, candidates=uri_source(candidates_uri), pool_scores=scores, instructions_only=True
        )
    )
    sequential = time.perf_counter() - started
    print(
        f"filter       {replicas} replica(s): parallel part {parallel:6.1f} s + sequential part {sequential:5.1f} s"
        f"  ({len(candidates)} candidates against {args.pool:,} pooled, {decided.kept_count} kept)"
    )
    return parallel, sequential, [v.kept for v in decided.verdicts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the generator's model (default: the config's model.base)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompts-per-shard", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--pool", type=int, default=50_000)
    parser.add_argument("--candidates", type=int, default=4_000)
    parser.add_argument("--candidates-per-shard", type=int, default=500)
    args = parse_args(parser, QUICK)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway loopback cluster

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.api import SERVICER_FUNCTIONS, common_pb2, filter_pb2
    from services.client import ServiceClients
    from services.common.convert import uri_source
    from services.common.store import RunStore
    from services.filter.deployment import build_app as build_filter
    from services.generator.deployment import build_app as build_generator
    from services.serving import wait_for_previous_cluster

    root = tempfile.mkdtemp(prefix="scale-out-")
    store = RunStore(root)
    wait_for_previous_cluster()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)  # even beside a `ray start` one
    try:
        serve.start(
            http_options=HTTPOptions(port=PORTS["http_port"]),
            grpc_options=gRPCOptions(port=PORTS["grpc_port"], grpc_servicer_functions=SERVICER_FUNCTIONS),
        )
        clients = ServiceClients(f"127.0.0.1:{PORTS['grpc_port']}", timeout_s=1800, retries=0)
        print(f"{os.cpu_count()} cores; generator replicas: one torch thread each")
        times, filter_times, decisions = {}, {}, {}
        for replicas in (1, 2):
            settings = _settings(root, args.model, replicas)
            _deploy("filter", build_filter, settings)
            filter_times[replicas] = _filter(args, clients, store, replicas, f"r{replicas}")
            decisions[replicas] = filter_times[replicas][2]
            _deploy("generator", build_generator, settings)
            times[replicas] = _generation(args, clients, store, settings, f"r{replicas}")
        started = time.perf_counter()
        whole = clients.filter_tasks(
            filter_pb2.FilterTasksRequest(
                context=common_pb2.RunContext(run_id="bench", round=2, run_key=store.claim_run("bench")),
                candidates=uri_source(store.dataset_uri("bench", 2, "candidates")),
                pool=uri_source(store.dataset_uri("bench", 2, "pool")),
                instructions_only=True,
            )
        )
        one_request = time.perf_counter() - started
        assert [v.kept for v in whole.verdicts] == decisions[1] == decisions[2], "the split filter decided differently"
        print(f"filter       one FilterTasks request (no split): {one_request:6.1f} s; the same decisions")
        f1, f2 = (sum(filter_times[r][:2]) for r in (1, 2))
        print(f"filter speed-up {f1 / f2:.2f} (parallel part alone {filter_times[1][0] / filter_times[2][0]:.2f})")
        print(f"speed-up {times[1] / times[2]:.2f}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
