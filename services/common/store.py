"""The run store: datasets (Parquet) and checkpoints per run and round, and a manifest per run.

Layout under the root:
    <run_id>/manifest.json                   what each stage of each round committed
    <run_id>/round-<k>/<name>.parquet         datasets
    <run_id>/round-<k>/model/                 HF checkpoint (safetensors)
Writes are atomic (write a temporary, then rename), so a reader never sees a partial file and a
crash leaves either the old state or the new one. A stage whose output is committed in the manifest
is never redone: that is how a rerun resumes.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_atomic
from .records import TaskRecord


class StoreError(RuntimeError):
    """A store operation failed (disk full, permissions, remote error); the message says which path."""


class StoreBusy(RuntimeError):
    """Another request is writing the same output right now."""


class UriNotAllowed(ValueError):
    """A URI from a client that points outside the store root or uses a scheme not configured;
    field names the request field, reason says why (without the field)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _split_scheme(uri: str) -> tuple[str, str]:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), rest
    return "file", uri


# The outputs the current request holds (claim_output), released when it ends (output_claims).
_OUTPUT_CLAIMS: contextvars.ContextVar[tuple[contextlib.ExitStack, set[str]] | None] = contextvars.ContextVar(
    "output_claims", default=None
)


@contextlib.contextmanager
def output_claims():
    """The scope of one request: the outputs it claims stay locked until it ends (grpc_handler)."""
    with contextlib.ExitStack() as stack:
        token = _OUTPUT_CLAIMS.set((stack, set()))
        try:
            yield
        finally:
            _OUTPUT_CLAIMS.reset(token)


class RunStore:
    def __init__(self, root: str, allowed_schemes: Iterable[str] = ("file",)):
        scheme, path = _split_scheme(root)
        self.scheme = scheme
        if scheme == "file":
            path = os.path.realpath(os.path.expanduser(path))
            os.makedirs(path, exist_ok=True)
        self.root = path.rstrip("/") or "/"
        self.allowed_schemes = {s.lower() for s in allowed_schemes} | {scheme}
        self.fs = fsspec.filesystem(scheme)
        self._manifest_lock = threading.Lock()

    # ---- URIs -----------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def uri(self, *parts: str) -> str:
        path = posixpath.join(self.root, *parts)
        return path if self.is_local else f"{self.scheme}://{path}"

    def dataset_uri(self, run_id: str, round_index: int, name: str) -> str:
        return self.uri(run_id, f"round-{round_index:03d}", f"{name}.parquet")

    def model_uri(self, run_id: str, round_index: int) -> str:
        return self.uri(run_id, f"round-{round_index:03d}", "model")

    def resolve(self, uri: str, field: str = "uri") -> str:
        """Returns the store path for a client-supplied URI, or raises UriNotAllowed naming field.

        Confinement: no '..' segments, a configured scheme, and (locally) the real path, symlinks
        resolved, must lie under the real root.
        """
        if not uri:
            raise UriNotAllowed(field, "empty URI")
        if "\x00" in uri:
            raise UriNotAllowed(field, "NUL byte in URI")
        scheme, path = _split_scheme(uri)
        if "://" not in uri and not uri.startswith("/") and not self.is_local:
            scheme, path = self.scheme, posixpath.join(self.root, uri)  # relative: a path in the store
        if scheme not in self.allowed_schemes or scheme != self.scheme:
            raise UriNotAllowed(field, f"scheme '{scheme}' is not allowed (store is {self.scheme}://)")
        if ".." in path.split("/"):
            raise UriNotAllowed(field, "'..' is not allowed in store URIs")
        if scheme == "file":
            if not os.path.isabs(path):
                path = os.path.join(self.root, path)
            real = os.path.realpath(path)
            if real != self.root and not real.startswith(self.root + os.sep):
                raise UriNotAllowed(field, f"{uri!r} is outside the run store root {self.root}")
            return real
        normalized = posixpath.normpath(path)
        if normalized != self.root and not normalized.startswith(self.root + "/"):
            raise UriNotAllowed(field, f"{uri!r} is outside the run store root")
        return normalized

    def output_path(self, uri: str, run_id: str, field: str = "uri", *, dataset: bool = True) -> str:
        """Where a client may write: only under its own run (<root>/<run_id>/), never the manifest, never
        a file a committed stage names, never inside a checkpoint; datasets are .parquet files. Raises
        UriNotAllowed naming field."""
        path = self.resolve(uri, field)
        run_dir = self.resolve(self.uri(run_id), field)
        if not path.startswith(run_dir + "/"):
            raise UriNotAllowed(
                field,
                f"{uri!r} is outside this request's run directory {run_dir} "
                "(context.run_id): a request writes only into its own run",
            )
        if dataset and not path.endswith(".parquet"):
            raise UriNotAllowed(field, f"{uri!r}: dataset outputs are .parquet files")
        if path == self.resolve(self.manifest_uri(run_id)):
            raise UriNotAllowed(field, "the run's manifest is written by the run store only")
        parent = posixpath.dirname(path)
        while parent.startswith(run_dir + "/"):
            if self.fs.exists(posixpath.join(parent, "config.json")):
                raise UriNotAllowed(field, f"{uri!r} is inside a checkpoint")
            parent = posixpath.dirname(parent)
        if path in self.committed_paths(run_id):
            raise UriNotAllowed(field, f"{uri!r} belongs to a committed stage and is never replaced")
        return path

    def committed_paths(self, run_id: str) -> set[str]:
        """Every store path that a committed stage of the run names (its outputs and checkpoints)."""
        paths = set()
        for entry in self.load_manifest(run_id).get("rounds", {}).values():
            for output in entry.get("stages", {}).values():
                for key, value in output.items():
                    if key.endswith("uri") and isinstance(value, str) and value:
                        try:
                            paths.add(self.resolve(value))
                        except UriNotAllowed:
                            pass  # an operator's model outside the store (model.base)
        return paths

    def claim_output(self, path: str) -> None:
        """Inside a request (output_claims): holds path's lock until the request ends, so a second
        request for the same output, while this one works, is refused (StoreBusy) at once, and the
        one told it succeeded is the one whose data is in the file. Outside a request: nothing (the
        write itself locks)."""
        scope = _OUTPUT_CLAIMS.get()
        if scope is None or path in scope[1]:
            return
        scope[0].enter_context(self.exclusive(path))
        scope[1].add(path)

    @contextlib.contextmanager
    def exclusive(self, path: str):
        """Held while a request writes path: a second writer of the same output at the same time is
        refused (StoreBusy) instead of both being told they succeeded. The lock dies with its process."""
        scope = _OUTPUT_CLAIMS.get()
        if not self.is_local or (scope is not None and path in scope[1]):  # this request holds it already
            yield
            return
        locks = os.path.join(os.path.dirname(path), ".locks")
        os.makedirs(locks, exist_ok=True)
        with open(os.path.join(locks, os.path.basename(path) + ".lock"), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(f"another request is writing {path} right now") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_output(self, uri: str, run_id: str, tasks: list[TaskRecord], field: str = "output_uri") -> int:
        """A client-requested dataset output: confined to its run (output_path), written exclusively."""
        path = self.output_path(uri, run_id, field)
        with self.exclusive(path):
            return self.write_tasks(path, tasks)

    # ---- atomic files ---------------------------------------------------------------------------
    def _write_atomic(self, path: str, write: Any) -> None:
        """A reader never sees half a file: locally atomic.write_atomic (the one helper for local files);
        elsewhere a temporary object moved over the target."""
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomic(path, write)
                return
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
                with self.fs.open(tmp, "wb") as handle:
                    write(handle)
                self.fs.mv(tmp, path)
            finally:
                if self.fs.exists(tmp):
                    self.fs.rm(tmp)
        except OSError as exc:
            raise StoreError(f"could not write {path}: {exc}") from exc

    def write_tasks(self, uri: str, tasks: list[TaskRecord]) -> int:
        path = self.resolve(uri)
        table = pa.Table.from_pylist([t.to_row() for t in tasks], schema=TASK_SCHEMA)
        self._write_atomic(path, lambda handle: pq.write_table(table, handle))
        return len(tasks)

    def read_tasks(self, uri: str, field: str = "uri") -> list[TaskRecord]:
        path = self.resolve(uri, field)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{field}: no dataset at {uri}")
        with self.fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        return [TaskRecord.from_row(r) for r in table.to_pylist()]

    def write_bytes(self, uri: str, payload: bytes) -> None:
        self._write_atomic(self.resolve(uri), lambda handle: handle.write(payload))

    def read_bytes(self, uri: str) -> bytes:
        with self.fs.open(self.resolve(uri), "rb") as handle:
            return handle.read()

    def write_json(self, uri: str, data: Any) -> None:
        path = self.resolve(uri)
        payload = json.dumps(data, indent=2, sort_keys=True).encode()
        self._write_atomic(path, lambda handle: handle.write(payload))

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def exists(self, uri: str) -> bool:
        return self.fs.exists(self.resolve(uri))

    def remove(self, uri: str) -> None:
        """Deletes one file, if it is there."""
        path = self.resolve(uri)
        if self.fs.exists(path):
            self.fs.rm(path)

    def uri_of(self, path: str) -> str:
        """The URI of a store path (what resolve returned): the path itself on a local store."""
        return path if self.is_local else f"{self.scheme}://{path}"

    def beside(self, uri: str, name: str) -> str:
        """The URI of a file called name in the same directory as uri."""
        return self.uri_of(posixpath.join(posixpath.dirname(self.resolve(uri)), name))

    def staging_uri(self, uri: str) -> str:
        """Where a checkpoint for uri is written before commit_directory makes it visible: beside it,
        so that on a local (or shared) filesystem the commit is one rename."""
        return self.uri_of(f"{self.resolve(uri)}.tmp-{uuid.uuid4().hex[:8]}")

    def put_directory(self, local_dir: str | Path, uri: str) -> None:
        """Copies a local directory (a checkpoint a worker saved) to uri."""
        self.fs.put(str(local_dir).rstrip("/") + "/", self.resolve(uri), recursive=True)

    def commit_directory(self, staging_uri: str, uri: str) -> None:
        """Makes a fully written staging directory (a checkpoint) visible at uri: one rename locally,
        a move elsewhere. A checkpoint is never replaced."""
        staging, path = self.resolve(staging_uri), self.resolve(uri)
        if self.fs.exists(path):  # never replaced: a finished checkpoint is found by its job id first
            raise StoreError(f"{path} exists already; a checkpoint is never replaced")
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(staging, path)
        else:
            self.fs.mv(staging, path, recursive=True)

    def remove_staging(self, uri: str) -> int:
        """Deletes the staging directories ('<uri>.tmp-*') a crashed training run left for uri: they
        were never visible as a model."""
        stale = self.fs.glob(self.resolve(uri) + ".tmp-*")
        for path in stale:
            self.fs.rm(path, recursive=True)
        return len(stale)

    def remove_stale_temporaries(self, run_id: str) -> int:
        """Deletes '*.tmp-*' files a killed writer left in a run (never visible under a real name).
        Directories are left alone: a trainer elsewhere may still be writing a checkpoint into one."""
        if not self.is_local:
            return 0
        removed = 0
        for dirpath, _, filenames in os.walk(self.resolve(self.uri(run_id))):
            for name in filenames:
                if ".tmp-" in name:
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
        return removed

    # ---- manifest ------------------------------------------------------------------------------
    def manifest_uri(self, run_id: str) -> str:
        return self.uri(run_id, "manifest.json")

    def load_manifest(self, run_id: str) -> dict:
        uri = self.manifest_uri(run_id)
        if not self.exists(uri):
            return {"run_id": run_id, "rounds": {}}
        return self.read_json(uri)

    def stage_output(self, run_id: str, round_index: int, stage: str) -> dict | None:
        return self.load_manifest(run_id)["rounds"].get(str(round_index), {}).get("stages", {}).get(stage)

    def commit_stage(self, run_id: str, round_index: int, stage: str, output: dict) -> dict:
        """Records a stage's output (URIs, counts, metrics) in the manifest, atomically."""
        with self._manifest_lock:
            manifest = self.load_manifest(run_id)
            round_entry = manifest["rounds"].setdefault(str(round_index), {"stages": {}})
            round_entry["stages"][stage] = {**output, "committed_at": time.time()}
            self.write_json(self.manifest_uri(run_id), manifest)
            return manifest

    # ---- stop requests (a file of their own: the manifest is read-modify-written by the driver alone) ----
    def _stop_uri(self, run_id: str) -> str:
        return self.uri(run_id, "stop-requested")

    def request_stop(self, run_id: str) -> None:
        self.write_bytes(self._stop_uri(run_id), b"stop after the round in progress\n")

    def stop_requested(self, run_id: str) -> bool:
        return self.exists(self._stop_uri(run_id))

    def clear_stop(self, run_id: str) -> None:
        self.remove(self._stop_uri(run_id))

    def update_run(self, run_id: str, **fields: Any) -> dict:
        with self._manifest_lock:
            manifest = self.load_manifest(run_id)
            manifest.update(fields)
            self.write_json(self.manifest_uri(run_id), manifest)
            return manifest


_LINEAGE_TYPE = pa.struct(
    [
        ("run_id", pa.string()),
        ("round", pa.int32()),
        ("stage", pa.string()),
        ("model", pa.string()),
        ("prompt_template", pa.string()),
        ("context_task_ids", pa.list_(pa.string())),
        ("scores_json", pa.string()),
        ("verdicts", pa.list_(pa.string())),
        ("parent_id", pa.string()),
    ]
)
TASK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("instruction", pa.string()),
        ("name", pa.string()),
        ("is_classification", pa.bool_()),
        ("instances", pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))),
        ("lineage", _LINEAGE_TYPE),
        ("format", pa.string()),
    ]
)
