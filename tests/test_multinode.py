"""Several Ray nodes on one machine (ray.cluster_utils.Cluster, as Ray's own multi-node tests use): a
head that takes no work, as KubeRay advises, and worker nodes whose custom resources place the
services. A whole small run with its services on chosen nodes; then the same run losing a worker node
mid-training and another mid-generation: it finishes with the undisturbed run's records. Every node
is a local process, so a tmp dir is what a shared volume is on a real cluster: the one store root
every node reads and writes.

    pytest -m multinode                  # both runs: 4 min 11 s on 2 cores (2026-12-02)
    pytest -m "multinode and not slow"   # the placed run alone: about 2 minutes
"""

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
import ray

from services.client import ServiceClients
from services.common.config import parse_config
from tests.ray_cluster import free_port, local_cluster, this_cluster
from tests.tiny import tiny_settings

pytestmark = [pytest.mark.ray, pytest.mark.multinode]

RUN = "mn"  # both runs have this id (each in its own store), so record ids compare across them
PLACED = [{"serving": 100}, {"training": 100}]  # node A: generation and evaluation; node B: training
EITHER = [{"serving": 100, "training": 100}] * 3  # any node takes anything: one survives two losses


def _settings(store_root: str, builtin_cache: str) -> dict:
    """The tiny preset, one round, without backtranslation, the control or the test stage: two
    trainings (round 0's bootstrap and round 1's) around one round of Self-Instruct."""
    s = tiny_settings(store_root, builtin_cache, free_port(), free_port())
    s["seeds"] = {"heldout_fraction": 0.1}
    s["backtranslation"] = {"enabled": False}
    s["loop"]["control"] = False
    s["evaluation"]["test_fraction"] = 0.0
    s["training"].update(max_steps=30, checkpoint_every=10, worker_resources={"training": 1})
    # six instruction prompts, one request each: a generation stage in flight long enough to lose a node in
    s["generation"].update(num_prompts=6, pool_refresh_prompts=6)
    s["fanout"]["prompts_per_shard"] = 1
    s["serve"]["generator"] = {"resources": {"serving": 1}}
    s["serve"]["evaluator"] = {"resources": {"serving": 1}}
    return s


class _CountingClients(ServiceClients):
    """The driver's clients, noting every call that failed (and was retried or raised)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[tuple[str, grpc.StatusCode]] = []

    def _call(self, app, method, request, timeout_s=None):
        def noted(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except grpc.RpcError as exc:
                self.failures.append((app, exc.code()))
                raise

        return super()._call(app, noted, request, timeout_s)


@contextmanager
def _cluster(worker_resources: list[dict], builtin_cache: str):
    """A head with no CPUs (only the driver, Serve's controller and the training jobs' drivers, which
    need none, run there) and one worker node per entry."""
    from services.common.models import ensure_builtin

    ensure_builtin("tiny-llama", builtin_cache)  # once, before replicas and workers all want it at once
    with local_cluster(0, worker_resources) as nodes:
        yield nodes


def _deploy_and_run(config, on_the_way=None) -> tuple[dict, _CountingClients]:
    """Deploys the four apps and runs the loop from this process (on the head node), with
    on_the_way(store_root) in a thread beside it."""
    from ray_jobs.self_improve import LoopDriver
    from services.serving import deploy_apps

    deploy_apps(config)
    clients = _CountingClients(f"127.0.0.1:{config.serve.grpc_port}", config.serve.request_timeout_s)
    errors: list[BaseException] = []
    if on_the_way is not None:

        def watch():
            try:
                on_the_way(Path(config.store.root))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    try:
        manifest = LoopDriver(config, clients, RUN).run()
    finally:
        clients.close()
    if on_the_way is not None:
        watcher.join(60)
        assert not errors, errors
        assert not watcher.is_alive(), "the run ended before the watcher was done"
    return manifest, clients


def _actors(class_prefix: str, state: str | None = None) -> list:
    """Actors of the class, alive or dead (the GCS keeps dead actors with the node they ran on)."""
    from ray.util.state import list_actors

    return [
        a
        for a in list_actors(address=this_cluster(), detail=True, limit=10_000, raise_on_missing_output=False)
        if a.class_name.startswith(class_prefix) and (state is None or a.state == state)
    ]


def _training_workers(store_root: str, state: str | None = None) -> list:
    """The Ray Train workers of this run's training jobs. Only of those: a trainer of another local
    cluster that finds no address of its own submits to the newest one, which may be this."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(this_cluster()).list_jobs()
    ours = {job.job_id for job in jobs if f"--store-root {store_root} " in job.entrypoint}
    return [a for a in _actors("RayTrainWorker", state) if a.job_id in ours]


def _nodes() -> dict[str, str]:
    """node id -> 'head', or the custom resources that tell the worker nodes apart."""
    from ray.util.state import list_nodes

    names = {}
    for node in list_nodes(address=this_cluster(), detail=True):
        custom = sorted(k for k in node.resources_total if k in ("serving", "training"))
        names[node.node_id] = "head" if node.is_head_node else "+".join(custom)
    return names


VOLATILE = {"elapsed_s", "committed_at", "job_id", "resumed_from_step"}
# DecidePromotion's comparator mean sums over a set of task ids (services/evaluator/gate.py), in an
# order that differs per process (string hashing): the last bit of that one float differs run to run.
SIGNIFICANT = 12


def _records(store_root: str, manifest: dict) -> dict:
    """Every round's stage outputs and every dataset they name, with the store root, timings and job
    ids taken out: what two runs of the same config must agree on to the last bit."""
    datasets = {}

    def visit(value):
        if isinstance(value, dict):
            return {k: visit(v) for k, v in sorted(value.items()) if k not in VOLATILE}
        if isinstance(value, list):
            return [visit(v) for v in value]
        if isinstance(value, float):
            return float(f"{value:.{SIGNIFICANT}g}")
        if isinstance(value, str) and value.startswith(store_root):
            relative = value[len(store_root) :]
            if value.endswith(".parquet") and Path(value).exists():
                datasets[relative] = visit(pq.read_table(value).to_pylist())
            return "<store>" + relative
        return value

    stages = {k: visit(r["stages"]) for k, r in sorted(manifest["rounds"].items())}
    return {"stages": stages, "datasets": datasets}


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not (found := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def _manifest(store_root: Path) -> dict:
    try:
        return json.loads((store_root / RUN / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"rounds": {}}


def _committed(store_root: Path, round_key: str, stage: str) -> bool:
    return stage in _manifest(store_root)["rounds"].get(round_key, {}).get("stages", {})


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, builtin_cache):
    """The placed run: generator and evaluator replicas only on node A (serving), training workers
    only on node B (training), the driver on the head. Its records are what a disturbed run must give."""
    store_root = str(tmp_path_factory.mktemp("placed"))
    config = parse_config(_settings(store_root, builtin_cache))
    with _cluster(PLACED, builtin_cache):
        started = time.time()
        manifest, _ = _deploy_and_run(config)
        print(f"\nundisturbed run: {time.time() - started:.0f} s")
        names = _nodes()
        placed = {
            "driver": names[ray.get_runtime_context().get_node_id()],
            **{app: {names[a.node_id] for a in _actors(f"ServeReplica:{app}:")} for app in ("generator", "evaluator")},
            "training workers": {names[a.node_id] for a in _training_workers(store_root)},
            "training worker pids": {a.pid: names[a.node_id] for a in _training_workers(store_root)},
            # the training jobs' drivers and Ray Train's controllers: a lost worker node takes none of them
            "training drivers": {names[a.node_id] for a in _actors("JobSupervisor") + _actors("TrainController")},
        }
    return store_root, manifest, placed


def test_a_run_placed_across_nodes(undisturbed):
    store_root, manifest, placed = undisturbed
    print(placed)
    assert manifest["status"] == "succeeded" and set(manifest["rounds"]) == {"0", "1"}
    assert placed["driver"] == "head"
    assert placed["generator"] == placed["evaluator"] == {"serving"}
    assert placed["training workers"] == {"training"}  # two runs, one worker each, both on node B
    assert len(placed["training worker pids"]) == 2
    assert placed["training drivers"] == {"head"}
    round_0, round_1 = (manifest["rounds"][k]["stages"] for k in ("0", "1"))
    for trained in (round_0["train"], round_1["train"]):
        progress = json.loads(
            Path(trained["model_uri"]).parent.joinpath(f".{trained['job_id']}.progress.json").read_text()
        )
        assert placed["training worker pids"][progress["pid"]] == "training"  # rank 0 wrote it on node B
        assert Path(trained["model_uri"], "model.safetensors").exists()
    # ... and replicas on node A loaded those checkpoints: round 0's model wrote round 1's instructions,
    # round 1's model was evaluated
    assert round_1["generate_instructions"]["model_uri"] == round_0["train"]["model_uri"]
    assert round_1["generate_instructions"]["count"] > 0, "round 0's model wrote no parseable instruction"
    assert round_1["evaluate"]["model_uri"] == round_1["train"]["model_uri"]
    assert round_1["evaluate"]["num_tasks"] == round_0["split"]["dev_tasks"] > 0


def _lose_node(cluster, node_id: str) -> None:
    victim = next(node for node in cluster.worker_nodes if node.node_id == node_id)
    cluster.remove_node(victim, allow_graceful=False)  # every process of the node is killed at once


def _progress(store_root: Path, round_key: str) -> dict:
    files = list((store_root / RUN / f"round-{int(round_key):03d}").glob(".train-*.progress.json"))
    try:
        return json.loads(files[0].read_text()) if files else {}
    except ValueError:
        return {}  # being replaced


@pytest.fixture(scope="module")
def disturbed(tmp_path_factory, builtin_cache):
    """The same run on three worker nodes that take anything, losing the node of round 0's training
    worker mid-training, then the node of the generator's replica while round 1's instruction
    prompts are in flight."""
    store_root = tmp_path_factory.mktemp("disturbed")
    config = parse_config(_settings(str(store_root), builtin_cache))
    timings: dict[str, float] = {}
    lost: dict[str, str] = {}
    with _cluster(EITHER, builtin_cache) as (cluster, _):

        def lose_two_nodes(store_root: Path):
            # a checkpoint in, and time for Ray Train's controller to register it (it does so asynchronously)
            _wait(lambda: _progress(store_root, "0").get("step", 0) >= 15, 300, "round 0's training")
            worker = _wait(lambda: _training_workers(str(store_root), "ALIVE"), 30, "the training worker")[0]
            lost["training"], timings["training lost"] = worker.node_id, time.time()
            _lose_node(cluster, worker.node_id)
            _wait(
                lambda: (
                    (p := _progress(store_root, "0")).get("pid", worker.pid) != worker.pid
                    and p["step"] > p["resumed_from_step"]
                ),
                300,
                "training to go on",
            )
            timings["training again"] = time.time()

            shards = store_root / RUN / "round-001" / "shards" / "generate_instructions"
            _wait(lambda: list(shards.rglob("*.json")), 300, "round 1's first instruction shard")
            assert not _committed(store_root, "1", "generate_instructions"), "too late: the stage is committed"
            replica = _actors("ServeReplica:generator:", "ALIVE")[0]
            lost["generator"], timings["generator lost"] = replica.node_id, time.time()
            _lose_node(cluster, replica.node_id)
            _wait(lambda: _committed(store_root, "1", "generate_instructions"), 300, "the stage to commit")
            timings["stage committed"] = time.time()

        manifest, clients = _deploy_and_run(config, lose_two_nodes)
        timings["end"] = time.time()
        for event, back in (("training lost", "training again"), ("generator lost", "stage committed")):
            recovered, done = timings[back] - timings[event], timings["end"] - timings[event]
            print(f"\n{event}: {back} {recovered:.0f} s later; the run done {done:.0f} s after the loss")
        survivors = {node.node_id for node in cluster.worker_nodes}  # remove_node took the lost ones out
        after = {
            "head": ray.get_runtime_context().get_node_id(),
            "replicas": _replicas_once_running(),
            "training workers": {a.node_id for a in _training_workers(str(store_root), "ALIVE")},
        }
    return str(store_root), manifest, clients.failures, lost, survivors, after


def _replicas_once_running() -> dict[str, set[str]]:
    """app -> the nodes of its live replicas, once Serve says every app is running."""
    from ray import serve

    apps = ("generator", "filter", "trainer", "evaluator")
    _wait(lambda: all(serve.status().applications[a].status == "RUNNING" for a in apps), 120, "Serve's apps")
    placed: dict[str, set[str]] = {}
    for actor in _actors("ServeReplica:", "ALIVE"):
        placed.setdefault(actor.class_name.split(":")[1], set()).add(actor.node_id)
    return placed


@pytest.mark.slow
def test_losing_the_training_node_mid_training(disturbed):
    """Ray Train restarts the worker on another node from the last checkpoint."""
    _, manifest, _, lost, survivors, _ = disturbed
    assert manifest["status"] == "succeeded"
    assert lost["training"] not in survivors
    resumed = manifest["rounds"]["0"]["stages"]["train"]["resumed_from_step"]
    assert resumed >= 10 and resumed % 10 == 0  # from a checkpoint, not from step 0
    assert manifest["rounds"]["1"]["stages"]["train"]["resumed_from_step"] == 0


@pytest.mark.slow
def test_losing_the_generator_node_mid_stage(disturbed):
    """The shards the lost replica held are sent again; nothing is lost or doubled."""
    _, manifest, failures, lost, survivors, _ = disturbed
    assert lost["generator"] not in survivors
    # a request the lost replica held failed and was sent again
    assert {("generator", grpc.StatusCode.UNAVAILABLE), ("generator", grpc.StatusCode.INTERNAL)} & set(failures)
    stage = manifest["rounds"]["1"]["stages"]["generate_instructions"]
    generated = pq.read_table(stage["uri"]).to_pylist()
    assert len({r["id"] for r in generated}) == len(generated) == stage["count"] > 0


@pytest.mark.slow
def test_the_disturbed_run_has_the_undisturbed_runs_records(disturbed, undisturbed):
    store_root, manifest, _, _, survivors, after = disturbed
    assert set(after["replicas"]) == {"generator", "filter", "trainer", "evaluator"}
    assert set().union(*after["replicas"].values()) <= survivors | {after["head"]}  # the trainer's takes no CPU
    assert after["training workers"] <= survivors
    assert _records(store_root, manifest) == _records(undisturbed[0], undisturbed[1])
