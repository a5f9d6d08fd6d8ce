"""The run store: datasets (Parquet) and checkpoints per run and round, and a manifest per run.

Layout under the root:
    <run_id>/owner                           SHA-256 of the run's key (written once, by its driver)
    <run_id>/manifest.json                   what each stage of each round committed
    <run_id>/round-<k>/<name>.parquet         datasets
    <run_id>/round-<k>/model/                 HF checkpoint (safetensors)
    <run_id>/.locks/                          the output locks of requests writing into the run
    .keys/<run_id>                            the run's key itself (0600, in a 0700 folder): its driver's
Writes are atomic (write a temporary, then rename), so a reader never sees a partial file and a
crash leaves either the old state or the new one. A stage whose output is committed in the manifest
is never redone: that is how a rerun resumes.

A run belongs to whoever created it: its driver makes a secret key (claim_run), the store keeps only
its hash, and a request proves it may touch the run by sending the key (context.run_key; checked by
verify_run_key, once per request, in services.common.grpc_handler). Inside a request (request_run)
every store path resolves only inside the run the request proved it owns.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import hmac
import json
import os
import posixpath
import secrets
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


class NotRunOwner(PermissionError):
    """A request's context.run_key is not the key of its run, or the run has no owner yet
    (PERMISSION_DENIED); for the driver: the run belongs to another driver."""


class UriNotAllowed(ValueError):
    """A URI from a client that points outside the store root or uses a scheme not configured;
    field names the request field, reason says why (without the field)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


OWNER_FILE = "owner"
KEYS_DIR = ".keys"
LOCKS_DIR = ".locks"
# what the store and the driver write at the top of a run: never a request's output (nor a folder on
# the way to one, which would break `status`, `stop` and the driver)
RUN_FILES = frozenset({"manifest.json", OWNER_FILE, "stop-requested", "report.html", "inline", "ray_train"})
MAX_RUN_ID_CHARS = 256
MAX_URI_CHARS = 4096
MAX_NAME_BYTES = 255  # one file or folder name: NAME_MAX on Linux file systems (ENAMETOOLONG past it)


def _shown(uri: str, limit: int = 160) -> str:
    """A client's URI as an error message quotes it: repr, cut short (a message is one readable line)."""
    text = repr(uri)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[0]}"  # closed as repr opened it


def check_run_id(run_id: str) -> str | None:
    """Why run_id cannot name a run (None: it can): letters, digits, '-', '_' and '.', not starting
    with '.' (which would name the store root, its parent or the key folder)."""
    if not run_id.strip():
        return "must not be empty"
    if len(run_id) > MAX_RUN_ID_CHARS:
        return f"is {len(run_id)} characters; the limit is {MAX_RUN_ID_CHARS}"
    if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in run_id):
        return "may hold only letters, digits, '-', '_' and '.'"
    if run_id.startswith("."):
        return "must not start with '.'"
    return None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# The run the current request proved it owns (request_run): None, it proved none; _NO_REQUEST, this
# is no request (the driver, the CLI, a training job), whose paths are not confined to one run.
_NO_REQUEST = object()
_REQUEST_RUN: contextvars.ContextVar[object] = contextvars.ContextVar("request_run", default=_NO_REQUEST)


@contextlib.contextmanager
def request_run(run_id: str | None):
    """The scope of one request (grpc_handler): a store path inside a run resolves only when it is
    inside run_id, the run whose key the request carried; with None, no path inside any run does."""
    token = _REQUEST_RUN.set(run_id)
    try:
        yield
    finally:
        _REQUEST_RUN.reset(token)


def current_request_run() -> str | None:
    """The run the current request proved it owns; None for none (and outside a request)."""
    run = _REQUEST_RUN.get()
    return None if run is _NO_REQUEST else run


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
        if any(ord(c) < 32 or ord(c) == 127 for c in uri):  # NUL, a newline in a file name, ...
            raise UriNotAllowed(field, "control characters (NUL, newline, tab, ...) are not allowed in store URIs")
        if len(uri) > MAX_URI_CHARS:
            raise UriNotAllowed(field, f"is {len(uri)} characters; the limit is {MAX_URI_CHARS}")
        longest = max(uri.split("/"), key=lambda name: len(name.encode()))
        if len(longest.encode()) > MAX_NAME_BYTES:
            size, name = len(longest.encode()), _shown(longest, 60)
            raise UriNotAllowed(field, f"holds a name of {size} bytes ({name}); the limit is {MAX_NAME_BYTES}")
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
                # the root's own path is the operator's, not for a client's messages
                raise UriNotAllowed(field, f"{_shown(uri)} is outside the run store root")
            return self._confined_to_request_run(real, uri, field)
        normalized = posixpath.normpath(path)
        if normalized != self.root and not normalized.startswith(self.root + "/"):
            raise UriNotAllowed(field, f"{_shown(uri)} is outside the run store root")
        return self._confined_to_request_run(normalized, uri, field)

    def _in_store(self, path: str) -> str:
        """A store path as messages show it: relative to the root, whose own path is the operator's."""
        return "<store>" + path[len(self.root) :] if path.startswith(self.root) else _shown(path)

    def run_of(self, path: str) -> str:
        """The run a resolved store path lies in (its first folder under the root; '' for the root)."""
        return path[len(self.root) :].lstrip("/").split("/", 1)[0]

    def _confined_to_request_run(self, path: str, uri: str, field: str) -> str:
        """Inside a request, a path (symlinks resolved) must lie in the run whose key it carried."""
        run = _REQUEST_RUN.get()
        if run is _NO_REQUEST:
            return path
        if run is None:
            raise UriNotAllowed(
                field,
                f"{_shown(uri)} is in the run store: a request that reads or writes a run sends that run's key "
                "(context.run_key, which the run's driver holds)",
            )
        if self.run_of(path) != run:
            raise UriNotAllowed(
                field,
                f"{_shown(uri)} is outside this request's run {run!r} (context.run_id): a request reads and "
                "writes only its own run",
            )
        return path

    def output_path(self, uri: str, run_id: str, field: str = "uri", *, dataset: bool = True) -> str:
        """Where a client may write: only under its own run (<root>/<run_id>/), never the manifest or
        another file the store or the driver keeps at the top of a run (RUN_FILES), never a hidden
        name, never through a file (manifest.json/x.parquet), never a file a committed stage names,
        never inside a checkpoint; datasets are .parquet files. Checked before anything is created.
        Raises UriNotAllowed naming field."""
        path = self.resolve(uri, field)
        run_dir = self.resolve(self.uri(run_id), field)
        if not path.startswith(run_dir + "/"):
            raise UriNotAllowed(
                field,
                f"{_shown(uri)} is outside this request's run {run_id!r} "
                "(context.run_id): a request writes only into its own run",
            )
        if dataset and not path.endswith(".parquet"):
            raise UriNotAllowed(field, f"{_shown(uri)}: dataset outputs are .parquet files")
        parts = path[len(run_dir) + 1 :].split("/")
        if parts[0] == "manifest.json":
            raise UriNotAllowed(field, "the run's manifest is written by the run store only")
        if parts[0] in RUN_FILES:
            raise UriNotAllowed(
                field, f"{_shown(uri)}: {parts[0]!r} in a run is the run store's, never a request's output"
            )
        if any(part.startswith(".") for part in parts):
            raise UriNotAllowed(field, f"{_shown(uri)}: hidden names (locks, job files) are never a request's output")
        parent = run_dir
        for part in parts[:-1]:  # every folder on the way that exists already: a folder, not a checkpoint
            parent = posixpath.join(parent, part)
            if not self.fs.exists(parent):
                break
            if not self.fs.isdir(parent):
                raise UriNotAllowed(field, f"{_shown(uri)} passes through the file {part!r}")
            if self.fs.exists(posixpath.join(parent, "config.json")):
                raise UriNotAllowed(field, f"{_shown(uri)} is inside a checkpoint")
        if dataset and self.fs.isdir(path):
            raise UriNotAllowed(field, f"{_shown(uri)} is a folder")
        if not dataset and self.fs.isfile(path):
            raise UriNotAllowed(field, f"{_shown(uri)} is a file")
        if path in self.committed_paths(run_id):
            raise UriNotAllowed(field, f"{_shown(uri)} belongs to a committed stage and is never replaced")
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
        # one folder of the run's own holds its locks, named by the output's hash: taking a lock never
        # creates a folder on the output's path (output_path checked that path before)
        locks = os.path.join(self.root, self.run_of(path), LOCKS_DIR)
        os.makedirs(locks, exist_ok=True)
        with open(os.path.join(locks, hashlib.sha256(path.encode()).hexdigest()[:32] + ".lock"), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(f"another request is writing {self._in_store(path)} right now") from None
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
        except OSError as exc:  # the reason without the file name: a client may read this message
            raise StoreError(f"could not write {self._in_store(path)}: {exc.strerror or type(exc).__name__}") from exc

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
            raise StoreError(f"{self._in_store(path)} exists already; a checkpoint is never replaced")
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(staging, path)
        else:
            self.fs.mv(staging, path, recursive=True)

    def tree_digest(self, uri: str) -> str:
        """SHA-256 over a directory's files (their paths inside it and their contents' SHA-256): what
        a checkpoint's training job committed, checked before anyone adopts it."""
        root = self.resolve(uri)
        digest = hashlib.sha256()
        for path in sorted(self.fs.find(root)):
            content = hashlib.sha256()
            with self.fs.open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    content.update(chunk)
            digest.update(f"{posixpath.relpath(path, root)}\0{content.hexdigest()}\n".encode())
        return digest.hexdigest()

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

    # ---- ownership -----------------------------------------------------------------------------
    def owner_uri(self, run_id: str) -> str:
        return self.uri(run_id, OWNER_FILE)

    def key_uri(self, run_id: str) -> str:
        """Where the run's driver keeps the run's key: outside the run (no request resolves there), in
        the store root, so a driver resumed on another node of a cluster finds it."""
        return self.uri(KEYS_DIR, run_id)

    def run_owner(self, run_id: str) -> str | None:
        """The SHA-256 of the run's key; None while nobody has created the run."""
        try:
            with self.fs.open(posixpath.join(self.root, run_id, OWNER_FILE), "rb") as handle:
                return handle.read().decode().strip()
        except (FileNotFoundError, NotADirectoryError):  # no such run (or run_id names a file)
            return None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__  # not the file's path: a client may read this
            raise StoreError(f"could not read the owner of run {run_id!r}: {reason}") from exc

    def verify_run_key(self, run_id: str, key: str) -> None:
        """Raises NotRunOwner unless key is run_id's (its hash is the one in <run>/owner). Reads one
        file; creates nothing."""
        reason = check_run_id(run_id)
        if reason:
            raise UriNotAllowed("context.run_id", reason)
        stored = self.run_owner(run_id)
        if stored is None:
            raise NotRunOwner(f"run {run_id!r} has no owner: a run is created by its driver, never by a request")
        if not hmac.compare_digest(stored.encode(), key_digest(key).encode()):
            raise NotRunOwner(f"context.run_key is not the key of run {run_id!r}")

    def claim_run(self, run_id: str) -> str:
        """The driver's side: the run's key. Creating the run makes one (secrets.token_urlsafe), keeps
        it in key_uri (0600) and writes its hash to <run>/owner, once; a resumed driver reads it back.
        A run whose owner file names another key (its key file lost, or another driver's) raises
        NotRunOwner. A run made before runs had owners is claimed by the first driver that resumes it."""
        reason = check_run_id(run_id)
        if reason:
            raise UriNotAllowed("run_id", reason)
        key_path = posixpath.join(self.root, KEYS_DIR, run_id)
        key = self._read_key(run_id) or self._create_once(key_path, secrets.token_urlsafe(32), private=True)
        owner_path = posixpath.join(self.root, run_id, OWNER_FILE)
        owner = self.run_owner(run_id) or self._create_once(owner_path, key_digest(key))
        if not hmac.compare_digest(owner.encode(), key_digest(key).encode()):
            raise NotRunOwner(
                f"run {run_id!r} belongs to another driver: {self.key_uri(run_id)} does not hold the key "
                f"whose hash is in {self.owner_uri(run_id)}"
            )
        return key

    def _read_key(self, run_id: str) -> str | None:
        try:
            with self.fs.open(posixpath.join(self.root, KEYS_DIR, run_id), "rb") as handle:
                return handle.read().decode().strip() or None
        except FileNotFoundError:
            return None

    def _create_once(self, path: str, text: str, *, private: bool = False) -> str:
        """Writes text to path unless it exists; returns what path holds afterwards (another writer's
        text if it won). Locally exclusive: a hard link of a complete temporary. On an object store
        it asks fsspec for its create mode, which is exclusive only where the backend makes it so (a
        conditional write, e.g. S3's If-None-Match; fsspec's own default is check-then-write, and this
        project has not verified any cloud backend): where it is not, two drivers claiming one new run
        id at the same instant can both write, and then neither holds the key the owner file names
        (both get PERMISSION_DENIED: no run with two owners)."""
        if not self.is_local:
            try:
                self.fs.pipe_file(path, text.encode(), mode="create")
            except FileExistsError:
                pass  # the first writer's stays
            except TypeError:  # an fsspec without create mode
                if not self.fs.exists(path):
                    self._write_atomic(path, lambda handle: handle.write(text.encode()))
            with self.fs.open(path, "rb") as handle:
                return handle.read().decode().strip()
        os.makedirs(os.path.dirname(path), mode=0o700 if private else 0o777, exist_ok=True)
        if private:
            os.chmod(os.path.dirname(path), 0o700)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode())
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # never replaces: the first writer's file stays
        finally:
            os.remove(tmp)
        with open(path, "rb") as handle:
            return handle.read().decode().strip()

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
        (
            "filter",
            pa.struct(
                [
                    ("kept", pa.bool_()),
                    ("reasons", pa.list_(pa.string())),
                    ("max_rouge_l", pa.float64()),
                    ("nearest_instruction", pa.string()),
                ]
            ),
        ),
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
