"""A request writes only into its own run: never another run, the manifest, a committed stage's file
or a checkpoint; two writers of one output at once: one is refused. (Through the gRPC proxy:
test_e2e_grpc.test_a_request_cannot_touch_another_run.)"""

import threading

import pytest

from services.common.records import TaskRecord
from services.common.store import RunStore, StoreBusy, StoreError, UriNotAllowed

TASKS = [TaskRecord(id="a", instruction="Name a colour.")]


@pytest.fixture
def store(tmp_path):
    store = RunStore(str(tmp_path))
    store.write_tasks(store.dataset_uri("victim", 1, "kept"), TASKS)
    store.commit_stage("victim", 1, "filter", {"kept_uri": store.dataset_uri("victim", 1, "kept"), "kept_count": 1})
    store.write_tasks(store.dataset_uri("mine", 1, "kept"), TASKS)
    store.commit_stage("mine", 1, "filter", {"kept_uri": store.dataset_uri("mine", 1, "kept"), "kept_count": 1})
    model = tmp_path / "mine" / "round-001" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    return store


@pytest.mark.parametrize(
    "target, message",
    [
        ("victim/round-001/new.parquet", "outside this request's run"),  # another run
        ("victim/manifest.json", "outside this request's run"),
        ("x.parquet", "outside this request's run"),  # the store root
        ("mine/manifest.json", "parquet"),
        ("mine/round-001/kept.parquet", "committed stage"),  # a committed stage's output
        ("mine/round-001/model/extra.parquet", "inside a checkpoint"),
        ("mine/round-001/model/model.safetensors", "parquet"),
    ],
)
def test_outputs_are_confined_to_the_request_run(store, target, message):
    with pytest.raises(UriNotAllowed, match=message):
        store.write_output(store.uri(target), "mine", TASKS, "kept_uri")
    assert store.read_tasks(store.dataset_uri("victim", 1, "kept"))[0].id == "a"  # untouched


def test_a_new_output_in_the_own_run_is_written(store):
    assert store.write_output(store.dataset_uri("mine", 2, "kept"), "mine", TASKS) == 1
    assert store.write_output(store.dataset_uri("mine", 2, "kept"), "mine", TASKS) == 1  # a retry, uncommitted


def test_two_writers_of_one_output_one_is_refused(store, monkeypatch):
    uri = store.dataset_uri("mine", 3, "kept")
    inside, release = threading.Event(), threading.Event()
    original = store.write_tasks

    def slow_write(u, tasks):
        inside.set()
        release.wait(5)
        return original(u, tasks)

    monkeypatch.setattr(store, "write_tasks", slow_write)
    first = threading.Thread(target=store.write_output, args=(uri, "mine", TASKS))
    first.start()
    inside.wait(5)
    other = RunStore(store.root)  # another replica: its own lock handle on the same file
    with pytest.raises(StoreBusy, match="another request is writing"):
        other.write_output(uri, "mine", TASKS)
    release.set()
    first.join(5)
    assert [t.id for t in store.read_tasks(uri)] == ["a"]


def test_a_checkpoint_is_never_replaced(store, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text('{"new": true}')
    with pytest.raises(StoreError, match="never replaced"):
        store.commit_directory(str(staging), store.model_uri("mine", 1))
    assert (tmp_path / "mine" / "round-001" / "model" / "config.json").read_text() == "{}"


def test_a_request_holds_its_output_from_validation_to_its_end(store):
    """check_output_uri claims the output for the whole request (output_claims, entered by every gRPC
    handler): a second request for it while the first still works is refused at once, so the one
    told it succeeded is the one whose data is in the file; the first writes without locking itself
    out; the claim ends with the request."""
    from services.common.store import output_claims
    from services.common.validation import check_output_uri

    uri = store.dataset_uri("mine", 4, "kept")
    validated, finish = threading.Event(), threading.Event()
    outcome = {}

    def first_request():
        with output_claims():
            check_output_uri(uri, store, "kept_uri", "mine")
            validated.set()
            finish.wait(5)  # the request's work
            outcome["first"] = store.write_output(uri, "mine", TASKS, "kept_uri")

    first = threading.Thread(target=first_request)
    first.start()
    validated.wait(5)
    other = RunStore(store.root)
    with output_claims(), pytest.raises(StoreBusy, match="another request is writing"):
        check_output_uri(uri, other, "kept_uri", "mine")  # refused before it does any work
    finish.set()
    first.join(5)
    assert outcome["first"] == 1 and [t.id for t in store.read_tasks(uri)] == ["a"]
    with output_claims():  # released with the first request
        assert check_output_uri(uri, other, "kept_uri", "mine") == uri
