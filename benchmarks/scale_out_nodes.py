"""Does adding nodes make a round faster? benchmarks.scale_out's generation stage, and a training job,
on a Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster, tests/ray_cluster.py:
the fixture the multinode tests use): a head that takes no work, as KubeRay advises, and two worker
nodes, each with one `replica_slot` and one `train_slot`, so that two generator replicas or two
training workers can only run on different nodes.

    python -m benchmarks.scale_out_nodes [--prompts 16] [--train-tasks 64] [--quick]

1. Instruction generation (the real default model, one torch thread per replica) with 1 generator
   replica, then 2, one on each worker node: the same prompts, seed and shards (benchmarks.scale_out).
2. A training job (configs/local.yaml's recipe: LoRA, bf16, one epoch; one torch thread per worker)
   with 1 Ray Train worker, then 2 (DDP), one on each worker node. The batch is per worker, so 2
   workers take half the steps each; the ratio is of the training loop's own time (the job's progress
   file), beside the job's wall time with its start.

Every node is a process of this machine, so 2 nodes are its 2 cores: the ratios say what the code
loses to the fan-out and gradient exchange, not what 2 real machines give. The last two lines are
`generation speed-up 1.xx` and `training speed-up 1.xx`. --quick: the built-in tiny Llama, a few prompts
and tasks (about two minutes, mostly nodes starting and jobs being submitted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import parse_args
from .scale_out import PORTS, _deploy, _generation, _settings

REPO = Path(__file__).resolve().parent.parent
NODE = {"replica_slot": 1, "train_slot": 1}  # one replica and one training worker per worker node
QUICK = {"model": "builtin:tiny-llama", "prompts": 4, "max_new_tokens": 8, "train_tasks": 8, "max_seq_len": 64}


def _node_names() -> dict[str, str]:
    from ray.util.state import list_nodes

    from tests.ray_cluster import this_cluster

    workers = sorted(n.node_id for n in list_nodes(address=this_cluster(), detail=True) if not n.is_head_node)
    return {node_id: f"node {i + 1}" for i, node_id in enumerate(workers)}


def _placed(class_prefix: str, job_ids: set[str] | None = None) -> list[str]:
    """The worker nodes the alive actors of a class run on (of those jobs only, when given)."""
    from ray.util.state import list_actors

    from tests.ray_cluster import this_cluster

    names = _node_names()
    actors = list_actors(address=this_cluster(), detail=True, limit=10_000, raise_on_missing_output=False)
    return sorted(
        names.get(a.node_id, "head")
        for a in actors
        if a.class_name.startswith(class_prefix) and a.state == "ALIVE" and (job_ids is None or a.job_id in job_ids)
    )


def _training_params(args, workers: int):
    from services.common.config import load_config

    recipe = load_config(str(REPO / "configs" / "local.yaml")).training
    return recipe.model_copy(
        update=dict(
            num_workers=workers,
            torch_threads=1,
            worker_resources={"train_slot": 1},
            max_seq_len=args.max_seq_len or recipe.max_seq_len,
            checkpoint_every=10**6,  # no checkpoint inside the timed loop
            max_steps=0,
        )
    )


def _training(args, service, store, workers: int) -> tuple[float, float]:
    """One training job with `workers` workers; (the training loop's seconds, the job's wall seconds)."""
    from ray.job_submission import JobSubmissionClient

    from services.common.formats import load_seed_tasks
    from tests.ray_cluster import this_cluster

    name = f"train-{workers}"
    data = store.dataset_uri(name, 1, "train")
    store.write_tasks(data, load_seed_tasks()[: args.train_tasks])
    started = time.perf_counter()
    job = service.start(name, 1, args.model, data, store.model_uri(name, 1), _training_params(args, workers))
    placed: list[str] = []
    while (job := service.status(job.job_id)).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        if not placed and job.step:
            ours = {j.job_id for j in JobSubmissionClient(this_cluster()).list_jobs() if name in j.entrypoint}
            placed = _placed("RayTrainWorker", ours)
        time.sleep(0.5)
    wall = time.perf_counter() - started
    if job.state != "SUCCEEDED":
        raise RuntimeError(f"training with {workers} worker(s) {job.state}: {job.error}")
    loop_s = store.read_json(job.progress_uri)["elapsed_s"]
    where = ", ".join(placed) or "(ended before it was seen)"
    print(
        f"training     {workers} worker(s) on {where}: loop {loop_s:6.1f} s, job {wall:6.1f} s"
        f"  ({job.examples} examples, {job.total_steps} steps each)"
    )
    return loop_s, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompts-per-shard", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--train-tasks", type=int, default=64, help="seed tasks in the training set")
    parser.add_argument("--max-seq-len", type=int, default=0, help="0: the recipe's")
    args = parse_args(parser, QUICK)

    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.api import SERVICER_FUNCTIONS
    from services.client import ServiceClients
    from services.common.models import ensure_builtin
    from services.common.store import RunStore
    from services.generator.deployment import build_app as build_generator
    from services.serving import wait_for_previous_cluster
    from services.trainer.service import TrainerService
    from tests.ray_cluster import local_cluster

    root = tempfile.mkdtemp(prefix="scale-out-nodes-")
    store = RunStore(root)
    if args.model.startswith("builtin:"):  # once, before replicas and workers all want it
        ensure_builtin(args.model.removeprefix("builtin:"))
    wait_for_previous_cluster()
    try:
        with local_cluster(0, [NODE, NODE]):
            serve.start(
                http_options=HTTPOptions(port=PORTS["http_port"]),
                grpc_options=gRPCOptions(port=PORTS["grpc_port"], grpc_servicer_functions=SERVICER_FUNCTIONS),
            )
            clients = ServiceClients(f"127.0.0.1:{PORTS['grpc_port']}", timeout_s=1800, retries=0)
            print(f"{os.cpu_count()} cores; a head taking no work and 2 worker nodes; one torch thread per process")
            generation = {}
            for replicas in (1, 2):
                settings = _settings(root, args.model, replicas)
                settings["serve"]["generator"]["resources"] = {"replica_slot": 1}
                _deploy("generator", build_generator, settings)
                print(f"generator replicas on {', '.join(_placed('ServeReplica:generator:'))}")
                generation[replicas] = _generation(args, clients, store, settings, f"n{replicas}")
            serve.delete("generator")  # its replicas hold the nodes' cores; training gets them alone
            clients.close()
            service = TrainerService(store)
            training = {workers: _training(args, service, store, workers) for workers in (1, 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"training speed-up with the job's start {training[1][1] / training[2][1]:.2f}")
    print(f"generation speed-up {generation[1] / generation[2]:.2f}")
    print(f"training speed-up {training[1][0] / training[2][0]:.2f}")


if __name__ == "__main__":
    main()
