import os

import pytest

from services.common.records import FilterVerdict, Instance, Lineage, TaskRecord
from services.common.store import RunStore, StoreError, UriNotAllowed


def _task(i: int) -> TaskRecord:
    return TaskRecord(
        id=f"t{i}",
        instruction=f"Do thing {i}",
        instances=[Instance("in", "out")],
        lineage=Lineage(
            run_id="r",
            round=1,
            stage="s",
            model="m",
            prompt_template="p@1",
            context_task_ids=["a", "b"],
            scores={"x": 0.5},
            verdicts=["instances_by:t@1"],
            filter=FilterVerdict(i % 2 == 1, [] if i % 2 else ["rouge_l_too_similar"], 0.25 * i, f"near {i}"),
        ),
    )


def test_roundtrip_keeps_lineage(tmp_path):
    store = RunStore(str(tmp_path))
    uri = store.dataset_uri("run", 1, "kept")
    store.write_tasks(uri, [_task(1), _task(2)])
    back = store.read_tasks(uri)
    assert [t.id for t in back] == ["t1", "t2"]
    assert back[0].lineage.scores == {"x": 0.5}
    assert back[0].lineage.context_task_ids == ["a", "b"]
    assert back[0].instances[0].output == "out"
    assert back[0].lineage.filter == FilterVerdict(True, [], 0.25, "near 1")
    assert back[1].lineage.filter.label == "rejected:rouge_l_too_similar"


def test_a_record_the_filter_has_not_seen_has_no_verdict_and_old_files_still_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = RunStore(str(tmp_path))
    uri = store.dataset_uri("run", 1, "candidates")
    store.write_tasks(uri, [TaskRecord(id="c", instruction="Do it.")])
    assert store.read_tasks(uri)[0].lineage.filter is None
    # a file written before the verdict was typed: its lineage struct has no "filter" field
    old = pa.Table.from_pylist(
        [{"id": "o", "instruction": "Old.", "lineage": {"run_id": "r", "verdicts": ["kept"], "scores_json": "{}"}}]
    )
    pq.write_table(old, store.resolve(uri))
    back = store.read_tasks(uri)[0]
    assert (back.id, back.lineage.filter, back.lineage.verdicts) == ("o", None, ["kept"])


def test_failed_write_leaves_old_file_and_no_partial(tmp_path):
    store = RunStore(str(tmp_path))
    uri = store.dataset_uri("run", 1, "kept")
    store.write_tasks(uri, [_task(1)])

    def explode(handle):
        handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(StoreError, match="No space left"):
        store._write_atomic(store.resolve(uri), explode)
    assert [t.id for t in store.read_tasks(uri)] == ["t1"]
    assert not [p for p in os.listdir(os.path.dirname(uri)) if ".tmp-" in p]


def test_commit_stage_and_resume(tmp_path):
    store = RunStore(str(tmp_path))
    assert store.stage_output("run", 1, "filter") is None
    store.commit_stage("run", 1, "filter", {"kept_count": 3})
    store.commit_stage("run", 2, "train", {"model_uri": "x"})
    fresh = RunStore(str(tmp_path))  # a new process sees what the old one committed
    assert fresh.stage_output("run", 1, "filter")["kept_count"] == 3
    assert fresh.stage_output("run", 2, "train")["model_uri"] == "x"
    assert fresh.stage_output("run", 2, "filter") is None


@pytest.mark.parametrize(
    "bad",
    [
        "../etc/passwd",
        "/etc/passwd",
        "s3://bucket/x.parquet",
        "http://example.com/x",
        "run/../../x.parquet",
        "",
        "file:///etc/passwd",
    ],
)
def test_confinement_rejects(tmp_path, bad):
    store = RunStore(str(tmp_path / "root"))
    with pytest.raises(UriNotAllowed):
        store.resolve(bad, "tasks.uri")


def test_confinement_rejects_symlink_escape(tmp_path):
    root = tmp_path / "root"
    store = RunStore(str(root))
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UriNotAllowed, match="outside"):
        store.resolve(str(root / "link" / "x.parquet"), "tasks.uri")


def test_confinement_accepts_inside(tmp_path):
    store = RunStore(str(tmp_path))
    assert store.resolve(store.dataset_uri("r", 0, "x")).startswith(os.path.realpath(tmp_path))
    assert store.resolve("r/round-000/x.parquet").startswith(os.path.realpath(tmp_path))


def test_error_names_field(tmp_path):
    store = RunStore(str(tmp_path))
    with pytest.raises(UriNotAllowed, match="^candidates.uri"):
        store.resolve("/etc/passwd", "candidates.uri")


def test_stale_temporaries_removed_but_not_directories(tmp_path):
    store = RunStore(str(tmp_path))
    store.commit_stage("run", 0, "split", {"n": 1})
    run_dir = tmp_path / "run"
    (run_dir / "manifest.json.tmp-deadbeef").write_text("{half")
    (run_dir / "round-001").mkdir()
    (run_dir / "round-001" / "model.tmp-cafe0000").mkdir()
    assert store.remove_stale_temporaries("run") == 1
    assert not (run_dir / "manifest.json.tmp-deadbeef").exists()
    assert (run_dir / "round-001" / "model.tmp-cafe0000").is_dir()
    output = store.stage_output("run", 0, "split")
    assert output.pop("n") == 1 and isinstance(output.pop("committed_at"), float) and output == {}


@pytest.mark.parametrize(
    "name, message",
    [
        ("a" * 300 + ".parquet", "holds a name of 308 bytes"),  # past NAME_MAX: ENAMETOOLONG, once INTERNAL
        ("x\ny.parquet", "control characters"),
        ("x\ty.parquet", "control characters"),
        ("/".join(["d" * 200] * 30) + "/x.parquet", "characters; the limit is 4096"),
    ],
)
def test_names_no_file_system_takes_are_refused_in_one_short_line(tmp_path, name, message):
    store = RunStore(str(tmp_path))
    store.claim_run("r")
    with pytest.raises(UriNotAllowed, match=f"^output_uri: .*{message}") as refused:
        store.output_path(f"{tmp_path}/r/round-001/{name}", "r", "output_uri")
    assert len(str(refused.value)) < 250 and "\n" not in str(refused.value)


def test_refusals_do_not_reveal_where_the_store_lives(tmp_path):
    store = RunStore(str(tmp_path / "secret-root"))
    store.claim_run("r")
    for uri in ("/etc/x.parquet", "other/x.parquet"):
        with pytest.raises(UriNotAllowed) as refused:
            store.output_path(uri, "r", "output_uri")
        assert "secret-root" not in str(refused.value)


def test_claiming_a_run_on_an_object_store_asks_for_a_conditional_create(monkeypatch):
    """On an object store (fsspec's in-memory filesystem here) the key is written in fsspec's create
    mode, which a backend with conditional writes makes exclusive: a second driver's write does not
    replace the first's key, and a key that is not the owner's is refused as another driver's."""
    import uuid

    from services.common.store import NotRunOwner

    root = f"memory:///claims-{uuid.uuid4().hex[:8]}"
    first, second = RunStore(root), RunStore(root)
    key = first.claim_run("r")
    # the second driver's write is a conditional create (S3's If-None-Match, checked by the server),
    # never "does it exist? then write", which two drivers can both pass at once
    modes, pipe_file = [], second.fs.pipe_file

    def recorded(path, value, mode="overwrite", **kwargs):
        modes.append(mode)
        return pipe_file(path, value, mode=mode, **kwargs)

    with monkeypatch.context() as race:
        race.setattr(second.fs, "pipe_file", recorded)
        assert second._create_once(f"{second.root}/.keys/r", "the second driver's key") == key
    assert modes == ["create"]
    assert first.claim_run("r") == key  # the first driver's key stands
    other = RunStore(root)
    other.fs.rm(f"{other.root}/.keys/r")
    other.fs.pipe_file(f"{other.root}/.keys/r", b"not the key")
    with pytest.raises(NotRunOwner, match="belongs to another driver"):
        other.claim_run("r")
