"""A bounded load test of the filter service through Serve's gRPC proxy, on loopback only.

    python -m benchmarks.load_filter [--clients 8] [--requests 2000] [--seconds 60]

Starts its own local Ray with the filter app (ports 9600/8600), sends at most --requests requests
from --clients threads for at most --seconds, each a FilterTasks call with 8 candidates against a
100-instruction pool, every call with a deadline. Reports requests/s, p50/p99 latency, status codes,
and the filter replica's resident memory before and after (it should stay flat)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import grpc

from . import parse_args


def _replica_rss_mb() -> float:
    import ray
    from ray.util.state import list_actors

    # this cluster's address: without it the state API asks a `ray start` cluster (RAY_ADDRESS still wins)
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    for actor in alive:
        if "Filter" in (actor.class_name or "") and actor.pid:
            with open(f"/proc/{actor.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parse_args(parser, quick={"clients": 2, "requests": 20, "seconds": 10.0})
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.api import SERVICER_FUNCTIONS, common_pb2, filter_pb2
    from services.client import ServiceClients
    from services.common.config import parse_config
    from services.common.convert import tasks_to_source
    from services.common.formats import load_seed_tasks
    from services.filter.deployment import build_app

    from .rouge_filter import synthetic_instructions

    config = parse_config({"store": {"root": tempfile.mkdtemp(prefix="load-")}})
    from services.serving import wait_for_previous_cluster

    wait_for_previous_cluster()
    # its own cluster even while a `ray start` one runs here (the state API finds the replica)
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False)
    try:
        serve.start(
            http_options=HTTPOptions(port=8600),
            grpc_options=gRPCOptions(port=9600, grpc_servicer_functions=SERVICER_FUNCTIONS),
        )
        serve.run(build_app({"settings": config.model_dump()}), name="filter", route_prefix="/filter")
        seeds = load_seed_tasks()
        pool = tasks_to_source(seeds[:100])
        texts = synthetic_instructions(8 * 64, seed=9)
        requests = []
        for i in range(64):
            candidates = [seeds[(i * 8 + j) % len(seeds)] for j in range(8)]
            for j, task in enumerate(candidates):
                task.instruction = texts[i * 8 + j]
            requests.append(
                filter_pb2.FilterTasksRequest(
                    context=common_pb2.RunContext(run_id="load", round=1),
                    candidates=tasks_to_source(candidates),
                    pool=pool,
                )
            )
        clients = ServiceClients("127.0.0.1:9600", timeout_s=30, retries=0)
        clients.filter_tasks(requests[0])  # warm-up
        rss_before = _replica_rss_mb()
        latencies, codes, lock = [], {}, threading.Lock()
        issued = iter(range(args.requests))
        deadline = time.time() + args.seconds

        def worker() -> None:
            for n in issued:
                if time.time() > deadline:
                    return
                started = time.perf_counter()
                try:
                    clients.filter_tasks(requests[n % len(requests)])
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    codes[code] = codes.get(code, 0) + 1

        started = time.time()
        threads = [threading.Thread(target=worker) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.time() - started
        rss_after = _replica_rss_mb()
        latencies.sort()
        result = {
            "clients": args.clients,
            "requests": len(latencies),
            "seconds": round(wall, 1),
            "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "codes": codes,
            "replica_rss_mb_before": round(rss_before, 1),
            "replica_rss_mb_after": round(rss_after, 1),
        }
        print(json.dumps(result))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
