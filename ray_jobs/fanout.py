"""Fan-out: one stage split into shards that go out concurrently, so Serve spreads them over every
replica of the app.

Each shard has its own input and its own part of the stage's dataset under
`<run>/round-<k>/shards/<stage>/<layout>/`, named by its index, and a ledger entry (the service's
response and the SHA-256 of the part it wrote) written by the driver once the part is in. A rerun
after a crash sends only the shards without a ledger entry; the driver writes every shard's input
itself each time (it never sends an input it did not just write), and the stage's dataset is the
parts joined in shard order, each checked against its ledger hash first, committed only when every
shard is in. Record ids come from the run, round and the record's own id or prompt index, never from the
shard, so the shard count changes neither the ids nor the order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from services.common.records import TaskRecord
from services.common.store import RunStore, StoreError

log = logging.getLogger("reinstruct.fanout")

Response = TypeVar("Response", bound=Message)
Item = TypeVar("Item")


@dataclass(frozen=True)
class Shard(Generic[Item]):
    index: int
    items: Sequence[Item]  # the shard's prompt indices or tasks
    input_uri: str  # where the shard's tasks are (tasks shards only)
    output_uri: str  # the part of the stage's dataset the service writes


def split(items: Sequence[Item], per_shard: int) -> list[Sequence[Item]]:
    return [items[start : start + per_shard] for start in range(0, len(items), per_shard)]


class ShardedStage:
    """The shards of one stage of one round."""

    def __init__(
        self, store: RunStore, run_id: str, round_index: int, stage: str, max_in_flight: int, busy_wait_s: float
    ) -> None:
        """busy_wait_s: how long a shard answered ABORTED is tried again (another request holds its
        part: one a killed driver sent, which ends within the replicas' request budget)."""
        self.store, self.run_id, self.round_index, self.stage = store, run_id, round_index, stage
        self.max_in_flight, self.busy_wait_s = max_in_flight, busy_wait_s
        self.layout = ""  # set by shards(): which items, how many a shard
        self._part_digests: dict[str, str] = {}  # part URI -> the SHA-256 its ledger entry holds

    def uri(self, name: str) -> str:
        """A file of this stage's shards (under the layout's folder once shards() has run)."""
        parts = ("shards", self.stage, self.layout) if self.layout else ("shards", self.stage)
        return self.store.uri(self.run_id, f"round-{self.round_index:03d}", *parts, name)

    def ledger_uri(self, index: int) -> str:
        return self.uri(f"{index:05d}.json")

    def shards(self, items: Sequence[Item], per_shard: int, *, write_inputs: bool = False) -> list[Shard[Item]]:
        """write_inputs: items are TaskRecords, written as each shard's input (always: a file found
        there is never trusted).

        Shards live in a folder named by the layout (the items and the shard size): a rerun with
        another fanout setting starts a fresh ledger instead of mixing parts of two layouts."""
        keys = "\n".join(str(getattr(item, "id", item)) for item in items)
        self.layout = f"{per_shard}x-{hashlib.sha1(keys.encode()).hexdigest()[:10]}"
        out = []
        for index, part in enumerate(split(items, per_shard)):
            shard = Shard(index, part, self.uri(f"{index:05d}.input.parquet"), self.uri(f"{index:05d}.parquet"))
            if write_inputs:
                self.store.write_tasks(shard.input_uri, list(part))
            out.append(shard)
        return out

    def run(
        self,
        shards: list[Shard],
        send: Callable[[Shard], Response],
        response_type: type[Response],
        on_shard: Callable[[int, int], None] | None = None,
    ) -> list[Response]:
        """Sends every shard without a ledger entry (at most max_in_flight at once) and returns every
        shard's response in shard order. The first shard that fails fails the stage: shards not yet
        sent are not sent, those in flight finish, and every finished one stays in the ledger."""
        responses: dict[int, Response] = {}
        for shard in shards:
            entry = self._ledger_entry(shard)
            if entry is not None:
                responses[shard.index] = json_format.ParseDict(entry["response"], response_type())
                self._part_digests[shard.output_uri] = entry["part_sha256"]
        missing = [s for s in shards if s.index not in responses]
        if responses:
            log.info(
                "%s: %d of %d shards were done before; sending %d",
                self.stage,
                len(responses),
                len(shards),
                len(missing),
            )
        if on_shard is not None:
            on_shard(len(responses), len(shards))
        queue = list(missing)
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, self.max_in_flight), thread_name_prefix="shard") as pool:
            in_flight: dict = {}
            while queue or in_flight:
                while queue and failure is None and len(in_flight) < self.max_in_flight:
                    shard = queue.pop(0)
                    in_flight[pool.submit(self._send, send, shard)] = shard
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    shard = in_flight.pop(future)
                    try:
                        response = future.result()
                    except BaseException as exc:  # noqa: BLE001 - raised once the shards in flight settle
                        failure = failure or exc
                        continue
                    self._record(shard, response)
                    responses[shard.index] = response
                    if on_shard is not None:
                        on_shard(len(responses), len(shards))
        if failure is not None:
            raise failure  # the stage fails; the ledger keeps every shard that finished
        return [responses[s.index] for s in shards]

    def _ledger_entry(self, shard: Shard) -> dict | None:
        """The shard's ledger entry, None when there is none (or one of an older layout: sent again)."""
        if not self.store.exists(self.ledger_uri(shard.index)):
            return None
        entry = json.loads(self.store.read_bytes(self.ledger_uri(shard.index)))
        return entry if isinstance(entry, dict) and {"response", "part_sha256"} <= set(entry) else None

    def _part_digest(self, uri: str) -> str:
        return hashlib.sha256(self.store.read_bytes(uri)).hexdigest() if self.store.exists(uri) else ""

    def _record(self, shard: Shard, response: Response) -> None:
        """The ledger entry of a finished shard: the response, and the hash of the part as it is now."""
        digest = self._part_digest(shard.output_uri)
        entry = {"response": json_format.MessageToDict(response), "part_sha256": digest}
        self.store.write_bytes(self.ledger_uri(shard.index), json.dumps(entry).encode())
        self._part_digests[shard.output_uri] = digest

    def _send(self, send: Callable[[Shard], Response], shard: Shard) -> Response:
        gives_up, attempt = time.monotonic() + self.busy_wait_s, 0
        while True:
            try:
                return send(shard)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > gives_up:
                    raise
            time.sleep(min(0.5 * 2**attempt, 10.0))
            attempt += 1

    def join(self, parts: list[str], output_uri: str) -> int:
        """The stage's dataset: every part's tasks in shard order (parts_tasks)."""
        return self.store.write_tasks(output_uri, self.parts_tasks(parts))

    def parts_tasks(self, parts: list[str]) -> list[TaskRecord]:
        """Every part's tasks in shard order (empty parts give nothing). A part must be one this
        stage's ledger holds, unchanged since its shard finished."""
        tasks: list[TaskRecord] = []
        for uri in parts:
            if not uri:
                continue
            payload = self.store.read_bytes(uri) if uri in self._part_digests else None
            if payload is None or hashlib.sha256(payload).hexdigest() != self._part_digests[uri]:
                raise StoreError(
                    f"{uri} is not the part this stage's ledger recorded (changed since its shard finished, "
                    "or no shard's part): delete the stage's shards folder to run it again"
                )
            tasks += self.store.read_tasks(uri)
        return tasks
