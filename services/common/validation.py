"""Request validation shared by the deployments: every failure names the offending field.

Limits here bound what a client can make a replica do; they are deliberately generous for real use
and small enough that no single request can exhaust a replica.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..api import common_pb2
from .convert import task_from_proto
from .models import BUILTIN_PREFIX, BUILTIN_PRESETS
from .records import TaskRecord
from .store import RunStore, UriNotAllowed, check_run_id

MAX_TEXT_CHARS = 20_000
MAX_INLINE_TASKS = 10_000
MAX_INSTANCES_PER_TASK = 64
MAX_NEW_TOKENS = 4096
MAX_PROMPTS = 10_000
MAX_ID_CHARS = 256


MAX_REQUEST_NEW_TOKENS = 2_000_000  # prompts x max_new_tokens: what one request may ask a replica to write
MAX_BOOTSTRAP_CELLS = 5_000_000  # tasks x bootstrap resamples (a float each) in one comparison
# candidate tokens x pool tokens: the most exact LCS work one filter request may need if pruning fails
# (texts that share tokens in another order); Self-Instruct's scale (1,000 candidates against 52,000
# pooled, ~20 tokens each) is 2e10, 50 times below
MAX_ROUGE_CELLS = 1_000_000_000_000


class Overloaded(RuntimeError):
    """The service is at a limit right now (RESOURCE_EXHAUSTED): try again later."""


def check_cost(count: int, max_new_tokens: int, field: str) -> None:
    """Bounds what a request costs, not only each field: count prompts x max_new_tokens each."""
    if count * max_new_tokens > MAX_REQUEST_NEW_TOKENS:
        raise RequestError(
            field,
            f"{count} prompts x {max_new_tokens} new tokens is over the "
            f"{MAX_REQUEST_NEW_TOKENS:,} tokens one request may ask for; send it in parts",
        )


def check_rouge_cost(
    candidates: list, pool_tokens: int, *, candidates_join_pool: bool, field: str = "candidates"
) -> None:
    """Bounds a filter request's ROUGE-L work in the worst case, where the bound pruning cannot help:
    candidate tokens x pooled tokens (kept candidates join the pool in FilterTasks, not in ScoreNovelty)."""
    from .rouge import tokenize

    candidate_tokens = sum(len(tokenize(t.instruction)) for t in candidates)
    pool_tokens += candidate_tokens if candidates_join_pool else 0
    if candidate_tokens * pool_tokens > MAX_ROUGE_CELLS:
        raise RequestError(
            field,
            f"{candidate_tokens:,} candidate tokens against {pool_tokens:,} pooled is over the "
            f"{MAX_ROUGE_CELLS:,} token pairs one request may compare; send the candidates in parts",
        )


class RequestError(ValueError):
    """Bad input from a client; becomes gRPC INVALID_ARGUMENT with 'field: message'."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def check_text(value: str, field: str, *, required: bool = False, limit: int = MAX_TEXT_CHARS) -> str:
    if required and not value.strip():
        raise RequestError(field, "must not be empty")
    if len(value) > limit:
        raise RequestError(field, f"is {len(value)} characters; the limit is {limit}")
    if "\x00" in value:
        raise RequestError(field, "contains a NUL character")
    return value


def check_range(value: float, field: str, low: float, high: float) -> float:
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(field, "must be a finite number")
    if not low <= value <= high:
        raise RequestError(field, f"must be between {low} and {high}, got {value}")
    return value


def check_context(context: common_pb2.RunContext, field: str = "context") -> None:
    check_text(context.run_id, f"{field}.run_id", required=True, limit=MAX_ID_CHARS)
    reason = check_run_id(context.run_id)
    if reason:
        raise RequestError(f"{field}.run_id", reason)
    check_range(context.round, f"{field}.round", 0, 100_000)
    check_text(context.run_key, f"{field}.run_key", limit=MAX_ID_CHARS)


def authorize_run(context: common_pb2.RunContext, store: RunStore) -> str | None:
    """The one check of a run's key (grpc_handler, before the method runs): the run the request may
    read and write (its context.run_id when context.run_key is that run's key: NotRunOwner,
    PERMISSION_DENIED, otherwise), or None for a request without a key, which may then name no path
    inside any run (RunStore.resolve refuses it, naming context.run_key). Reads <run>/owner, creates
    nothing."""
    if not context.run_key:
        return None
    check_context(context)
    store.verify_run_key(context.run_id, context.run_key)
    return context.run_id


def check_sampling(sampling: common_pb2.Sampling, field: str = "sampling") -> None:
    check_range(sampling.temperature, f"{field}.temperature", 0.0, 2.0)
    check_range(sampling.top_p, f"{field}.top_p", 0.0, 1.0)
    if sampling.temperature > 0 and sampling.top_p <= 0:
        raise RequestError(f"{field}.top_p", "must be above 0 when sampling (temperature > 0)")
    check_range(sampling.max_new_tokens, f"{field}.max_new_tokens", 1, MAX_NEW_TOKENS)
    check_range(sampling.presence_penalty, f"{field}.presence_penalty", -2.0, 2.0)


@dataclass(frozen=True)
class TrustedModels:
    """Models the operator configured (model.base, the judge) and directories the operator allows
    (model.allowed_dirs): a client may name these. Every other model must lie in the run store."""

    names: frozenset[str] = frozenset()
    dirs: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config) -> TrustedModels:
        names = {config.model.base} | ({config.evaluation.judge_model} if config.evaluation.judge_model else set())
        dirs = tuple(os.path.realpath(os.path.expanduser(d)) for d in config.model.allowed_dirs)
        return cls(frozenset(names), dirs)

    def allows(self, uri: str) -> bool:
        if uri in self.names:
            return True
        real = os.path.realpath(os.path.expanduser(uri))
        return os.path.isabs(os.path.expanduser(uri)) and any(
            real == d or real.startswith(d + os.sep) for d in self.dirs
        )


def check_model_uri(
    uri: str, store: RunStore, field: str = "model_uri", trusted: TrustedModels = TrustedModels()
) -> str:
    """A preset, a model the operator trusts, or a checkpoint in the run store (returned as its
    resolved store URI, so a relative URI can never mean a directory outside the store; on a store
    that is not a local path, models.resolve_model fetches it where it is loaded)."""
    check_text(uri, field, required=True, limit=1024)
    if uri.startswith(BUILTIN_PREFIX):
        if uri[len(BUILTIN_PREFIX) :] not in BUILTIN_PRESETS:
            raise RequestError(
                field, f"unknown preset {uri!r}; presets: " + ", ".join(BUILTIN_PREFIX + p for p in BUILTIN_PRESETS)
            )
        return uri
    if trusted.allows(uri):
        return uri
    try:
        path = store.resolve(uri, field)
    except UriNotAllowed as exc:
        raise RequestError(
            field,
            exc.reason + " (and not a model the config allows: model.base, evaluation.judge_model, model.allowed_dirs)",
        ) from None
    if not any(store.fs.exists(f"{path}/{name}") for name in ("config.json", "adapter_config.json")):
        raise RequestError(field, f"no checkpoint at {uri!r} in the run store")
    return store.uri_of(path)


def check_output_uri(uri: str, store: RunStore, field: str, run_id: str, *, dataset: bool = True) -> str:
    """An output a request may write: under its own run, never a committed stage's file, the manifest
    or a checkpoint (RunStore.output_path); claimed for the rest of the request, so a concurrent
    request for the same output is refused at once (ABORTED). Empty means "answer inline"."""
    if uri:
        try:
            path = store.output_path(uri, run_id, field, dataset=dataset)
        except UriNotAllowed as exc:
            raise RequestError(field, exc.reason) from None
        store.claim_output(path)
    return uri


def resolve_tasks(
    source: common_pb2.TaskSource,
    store: RunStore,
    field: str,
    *,
    required: bool = True,
    require_instances: bool = False,
    require_instruction: bool = True,
) -> list[TaskRecord]:
    """Inline tasks (checked) or a dataset from the store (confined to its root)."""
    kind = source.WhichOneof("source")
    if kind is None:
        if required:
            raise RequestError(field, "give tasks inline or a dataset uri")
        return []
    if kind == "uri":
        try:
            return store.read_tasks(source.uri, f"{field}.uri")
        except UriNotAllowed as exc:
            raise RequestError(f"{field}.uri", exc.reason) from None
        except FileNotFoundError:
            raise RequestError(f"{field}.uri", f"no dataset at {source.uri}") from None
    tasks = source.inline.tasks
    if required and not tasks:
        raise RequestError(f"{field}.inline.tasks", "must not be empty")
    if len(tasks) > MAX_INLINE_TASKS:
        raise RequestError(
            f"{field}.inline.tasks",
            f"has {len(tasks)} tasks; the inline limit is {MAX_INLINE_TASKS} (send a dataset uri instead)",
        )
    for i, task in enumerate(tasks):
        where = f"{field}.inline.tasks[{i}]"
        check_text(task.id, f"{where}.id", limit=MAX_ID_CHARS)
        check_text(task.instruction, f"{where}.instruction", required=require_instruction)
        if task.format not in ("", "instruction", "raw"):
            raise RequestError(f"{where}.format", f"is {task.format[:40]!r}; 'instruction' (or empty) or 'raw'")
        if len(task.instances) > MAX_INSTANCES_PER_TASK:
            raise RequestError(
                f"{where}.instances", f"has {len(task.instances)}; the limit is {MAX_INSTANCES_PER_TASK}"
            )
        if require_instances and not task.instances:
            raise RequestError(f"{where}.instances", "must not be empty")
        for j, inst in enumerate(task.instances):
            check_text(inst.input, f"{where}.instances[{j}].input")
            check_text(inst.output, f"{where}.instances[{j}].output")
    return [task_from_proto(t) for t in tasks]
