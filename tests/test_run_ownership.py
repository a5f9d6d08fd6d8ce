"""A run belongs to whoever created it: its driver makes a key, the store keeps only the key's hash,
and a request reads or writes inside a run only with that run's key (context.run_key), checked once
per request by the gRPC handler before the method touches anything. No Ray: the deployments' methods
are called as Serve would call them, without a gRPC context (errors raise 'CODE: details'). Through
Serve's proxy, with the victim's own driver: test_e2e_grpc.test_a_client_cannot_plant_what_another_run_promotes."""

import hashlib
import os
import stat

import pytest

from services.api import common_pb2, filter_pb2
from services.common.convert import tasks_to_source, uri_source
from services.common.records import Instance, TaskRecord
from services.common.store import NotRunOwner, RunStore, UriNotAllowed
from tests.tiny import owned_context

TASKS = [TaskRecord(id="a", instruction="Name three rivers in Africa.", instances=[Instance("", "Nile, Congo, Niger")])]


def _tree(root) -> dict[str, bytes | None]:
    """Every file and folder under root (folders as None): what a refused request must leave alone."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                out[os.path.relpath(os.path.join(folder, name), root)] = handle.read()
    return out


@pytest.fixture
def replica(tmp_path):
    from services.filter.deployment import FilterDeployment

    return FilterDeployment.func_or_class({"store": {"root": str(tmp_path)}})


@pytest.fixture
def victim(tmp_path):
    """A run its driver created, with a dataset in it."""
    context = owned_context(str(tmp_path), "victim")
    store = RunStore(str(tmp_path))
    store.write_tasks(store.dataset_uri("victim", 1, "candidates"), TASKS)
    return context


def test_the_driver_keeps_the_key_and_the_run_only_its_hash(tmp_path):
    store = RunStore(str(tmp_path))
    key = store.claim_run("r")
    owner = (tmp_path / "r" / "owner").read_text()
    assert owner == hashlib.sha256(key.encode()).hexdigest() and key not in owner
    key_file = tmp_path / ".keys" / "r"
    assert key_file.read_text() == key  # outside the run: no request resolves there (no run id starts with '.')
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / ".keys").stat().st_mode) == 0o700
    assert RunStore(str(tmp_path)).claim_run("r") == key  # a resumed driver finds it
    key_file.unlink()  # the key lost (or another driver's store): the owner file is never replaced
    with pytest.raises(NotRunOwner, match="belongs to another driver"):
        store.claim_run("r")
    assert (tmp_path / "r" / "owner").read_text() == owner
    for bad in (".keys", ".", "..", "a/b", ""):
        with pytest.raises(UriNotAllowed):
            store.claim_run(bad)


def test_the_key_is_checked_against_the_hash(tmp_path):
    store = RunStore(str(tmp_path))
    key = store.claim_run("r")
    store.verify_run_key("r", key)
    with pytest.raises(NotRunOwner, match="not the key of run 'r'"):
        store.verify_run_key("r", key[:-1] + ("x" if key[-1] != "x" else "y"))
    with pytest.raises(NotRunOwner, match="no owner"):
        store.verify_run_key("nobody-made-me", key)  # a run no driver created: nothing may write it
    assert not (tmp_path / "nobody-made-me").exists()
    with pytest.raises(UriNotAllowed, match="must not start with '.'"):
        store.verify_run_key(".keys", key)


def test_a_request_with_a_wrong_key_is_refused_before_it_touches_anything(tmp_path, replica, victim):
    store = RunStore(str(tmp_path))
    before = _tree(tmp_path)
    forged = common_pb2.RunContext(run_id="victim", round=1, run_key="guessed")
    through_manifest = store.uri("victim", "manifest.json", "x.parquet")
    requests = {
        "an output in the run": filter_pb2.FilterTasksRequest(
            context=forged, candidates=tasks_to_source(TASKS), kept_uri=store.dataset_uri("victim", 1, "kept")
        ),
        "a lock path through the manifest": filter_pb2.FilterTasksRequest(
            context=forged,
            candidates=tasks_to_source(TASKS),
            kept_uri=through_manifest,
        ),
        "inline only": filter_pb2.FilterTasksRequest(context=forged, candidates=tasks_to_source(TASKS)),
    }
    for request in requests.values():
        with pytest.raises(RuntimeError, match="^PERMISSION_DENIED: context.run_key is not the key"):
            replica.FilterTasks(request)
    ghost = common_pb2.RunContext(run_id="future-run", round=1, run_key="anything")  # no owner yet
    with pytest.raises(RuntimeError, match="^PERMISSION_DENIED: run 'future-run' has no owner"):
        replica.FilterTasks(
            filter_pb2.FilterTasksRequest(
                context=ghost, candidates=tasks_to_source(TASKS), kept_uri=store.uri("future-run", "x.parquet")
            )
        )
    assert _tree(tmp_path) == before


def test_without_a_key_a_request_names_no_path_in_any_run(tmp_path, replica, victim):
    store = RunStore(str(tmp_path))
    before = _tree(tmp_path)
    anonymous = common_pb2.RunContext(run_id="victim", round=1)
    for request in (
        filter_pb2.FilterTasksRequest(
            context=anonymous, candidates=tasks_to_source(TASKS), kept_uri=store.dataset_uri("victim", 1, "kept")
        ),
        filter_pb2.FilterTasksRequest(
            context=anonymous, candidates=uri_source(store.dataset_uri("victim", 1, "candidates"))
        ),  # reading another run's data is refused as well
    ):
        with pytest.raises(RuntimeError, match="^INVALID_ARGUMENT: .*context.run_key"):
            replica.FilterTasks(request)
    assert _tree(tmp_path) == before
    # inline in, inline out: no run is touched, run_id is only a label in the lineage
    assert replica.FilterTasks(filter_pb2.FilterTasksRequest(context=anonymous, candidates=tasks_to_source(TASKS)))


def test_a_key_opens_its_own_run_only(tmp_path, replica, victim):
    store = RunStore(str(tmp_path))
    mine = owned_context(str(tmp_path), "attacker")
    before = _tree(tmp_path / "victim")
    for request, field in (
        (
            filter_pb2.FilterTasksRequest(
                context=mine, candidates=tasks_to_source(TASKS), kept_uri=store.dataset_uri("victim", 1, "kept")
            ),
            "kept_uri",
        ),
        (
            filter_pb2.FilterTasksRequest(
                context=mine, candidates=uri_source(store.dataset_uri("victim", 1, "candidates"))
            ),
            "candidates.uri",
        ),
        (  # the attacker's own run id with the victim's path: the path decides, not the id
            filter_pb2.FilterTasksRequest(
                context=mine, candidates=tasks_to_source(TASKS), pool=uri_source(store.uri("victim", "owner"))
            ),
            "pool.uri",
        ),
    ):
        with pytest.raises(RuntimeError, match=f"^INVALID_ARGUMENT: {field}: .*outside this request's run"):
            replica.FilterTasks(request)
    assert _tree(tmp_path / "victim") == before
    # the owner writes its own run; the output's lock lies in the run's own lock folder
    kept_uri = store.dataset_uri("victim", 1, "kept")
    response = replica.FilterTasks(
        filter_pb2.FilterTasksRequest(context=victim, candidates=tasks_to_source(TASKS), kept_uri=kept_uri)
    )
    assert response.kept_ref.count == 1 and [t.id for t in store.read_tasks(kept_uri)] == ["a"]
    assert os.listdir(tmp_path / "victim" / ".locks") and not (tmp_path / "victim" / "round-001" / ".locks").exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ("manifest.json/x.parquet", "run's manifest"),
        ("stop-requested/x.parquet", "run store's"),
        ("owner/x.parquet", "run store's"),
        (".locks/x.parquet", "hidden"),
        ("round-001/candidates.parquet/x.parquet", "passes through the file"),
    ],
)
def test_no_output_path_goes_through_what_the_store_keeps(tmp_path, replica, victim, target, message):
    """Refused with the run's key too, before a folder or lock is made: `status`, `stop` and the driver
    keep reading manifest.json and stop-requested as files (for runs yet to be made as well)."""
    store = RunStore(str(tmp_path))
    store.commit_stage("victim", 0, "split", {})
    store.request_stop("victim")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError, match=f"^INVALID_ARGUMENT: kept_uri: .*{message}"):
        replica.FilterTasks(
            filter_pb2.FilterTasksRequest(
                context=victim, candidates=tasks_to_source(TASKS), kept_uri=store.uri("victim", *target.split("/"))
            )
        )
    assert _tree(tmp_path) == before
    assert store.load_manifest("victim")["rounds"] and store.stop_requested("victim")


def test_a_stream_leaves_no_request_scope_behind(tmp_path):
    """A streaming method's scope (its run) lives in a context of its own: a caller that iterates it and
    then does other work (another request, the OpenAI endpoint) is not confined to that run."""
    from services.api import generator_pb2
    from services.common.grpc_handler import grpc_stream_method
    from services.common.store import current_request_run

    class Replica:
        store = RunStore(str(tmp_path))

        @grpc_stream_method
        def Stream(self, request):
            yield current_request_run()
            yield current_request_run()

    context = owned_context(str(tmp_path), "r")
    stream = Replica().Stream(generator_pb2.GenerateInstancesRequest(context=context))
    assert next(stream) == "r"
    assert current_request_run() is None and Replica.store.load_manifest("other")["rounds"] == {}
    assert next(stream) == "r"


def test_the_driver_joins_only_parts_its_ledger_recorded(tmp_path):
    """Shard inputs are written by the driver every time (a file found there is never sent); a part
    is joined only while it is what the ledger recorded when its shard finished."""
    from ray_jobs.fanout import ShardedStage
    from services.api import generator_pb2
    from services.common.store import StoreError

    store = RunStore(str(tmp_path))
    tasks = [TaskRecord(id=f"t{i}", instruction=f"Task {i}.") for i in range(3)]

    def stage():
        return ShardedStage(store, "r", 1, "classify", max_in_flight=2, busy_wait_s=0)

    sharded = stage()
    first = sharded.shards(tasks, 2, write_inputs=True)
    store.write_tasks(first[0].input_uri, [TaskRecord(id="planted", instruction="Forged.")])
    shards = stage().shards(tasks, 2, write_inputs=True)
    assert [t.id for t in store.read_tasks(shards[0].input_uri)] == ["t0", "t1"]  # rewritten, not trusted

    sent = []

    def send(shard):
        sent.append(shard.index)
        store.write_tasks(shard.output_uri, list(shard.items))
        return generator_pb2.TasksResponse(output=common_pb2.DatasetRef(uri=shard.output_uri, count=len(shard.items)))

    responses = sharded.run(shards, send, generator_pb2.TasksResponse)
    assert sharded.join([r.output.uri for r in responses], store.dataset_uri("r", 1, "classified")) == 3
    resumed = stage()
    again = resumed.run(resumed.shards(tasks, 2, write_inputs=True), send, generator_pb2.TasksResponse)
    assert sent == [0, 1]  # both shards were in: nothing sent again
    store.write_tasks(shards[1].output_uri, [TaskRecord(id="planted", instruction="Forged.")])
    with pytest.raises(StoreError, match="not the part this stage's ledger recorded"):
        resumed.join([r.output.uri for r in again], store.dataset_uri("r", 1, "classified"))
    with pytest.raises(StoreError, match="not the part"):  # a part no shard of the ledger wrote
        resumed.join([store.dataset_uri("r", 1, "elsewhere")], store.dataset_uri("r", 1, "classified"))


@pytest.mark.parametrize(
    "peer, host, loopback",
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1", True),
        ("ipv6:[::1]:5000", "::1", True),
        ("ipv6:%5B::1%5D:5000", "::1", True),  # what gRPC reports for a client on localhost over IPv6
        ("ipv6:%5B::ffff:127.0.0.1%5D:5000", "::ffff:127.0.0.1", True),
        ("ipv4:10.1.2.3:5000", "10.1.2.3", False),
        ("ipv6:%5B2001:db8::1%5D:5000", "2001:db8::1", False),
    ],
)
def test_loopback_admission_reads_the_peer_as_grpc_writes_it(peer, host, loopback):
    from services.common.grpc_handler import _peer_host, is_loopback

    assert _peer_host(peer) == host
    assert is_loopback(_peer_host(peer)) is loopback
