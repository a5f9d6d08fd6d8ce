"""The `reinstruct` command line: run the loop locally, serve the apps, export data."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.common.config import ConfigError, ReinstructConfig, load_config
from services.generator.corpus import BUILTIN_CORPORA

from .manifest import Decision, Filtered, Tested, rounds_of
from .self_improve import LoopDriver, Reporter, stage_count, summarize

app = typer.Typer(help="reinstruct: a model that improves by training on data it made itself.", no_args_is_help=True)
console = Console(soft_wrap=True)  # a log file gets whole lines, not 80-column cuts
_FILTER = ReinstructConfig().filter  # the filter command's defaults are the config's


def _load(config: Path | None, store_root: str | None = None, rounds: int | None = None) -> ReinstructConfig:
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        console.print(f"[red]config error[/red]\n{exc}")
        raise typer.Exit(2) from None
    if store_root:
        cfg.store.root = store_root
    if rounds is not None:
        cfg.loop.rounds = rounds
    return cfg


class RichReporter(Reporter):
    """Progress bars: one over all stages of the run, one for the training job in flight."""

    def __init__(self, progress: Progress, total_stages: int | None) -> None:
        self.progress = progress
        self.overall = progress.add_task("run", total=total_stages)
        self.training_task = None
        self.eval_task = None
        self.report_uri = None

    def stage(self, round_index: int, stage: str, resumed: bool) -> None:
        note = " [dim](resumed)[/dim]" if resumed else ""
        self.progress.update(self.overall, description=f"round {round_index}: {stage}{note}")

    def stage_done(self, round_index: int, stage: str, output: dict) -> None:
        self.progress.advance(self.overall)
        if stage == "train" and self.training_task is not None:
            self.progress.remove_task(self.training_task)
            self.training_task = None

    def evaluation(self, round_index: int, done: int, total: int) -> None:
        if self.eval_task is None:
            self.eval_task = self.progress.add_task(f"  evaluating model {round_index}", total=total)
        self.progress.update(self.eval_task, completed=done, total=total)
        if done >= total:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None

    def report(self, uri: str) -> None:
        self.report_uri = uri

    def training(self, round_index: int, step: int, total: int, loss: float) -> None:
        if self.training_task is None:
            self.training_task = self.progress.add_task(f"  training model {round_index}", total=total or None)
        self.progress.update(
            self.training_task,
            completed=step,
            total=total or None,
            description=f"  training model {round_index} (loss {loss:.3f})",
        )


class PlainReporter(Reporter):
    """For a log file, CI or `ray job logs` (stdout not a terminal): one plain line per stage and per
    progress step, with counts and the elapsed time, so a user can tail it."""

    def __init__(self, total_stages: int | None, echo=print) -> None:
        self.total, self.done, self.started, self.echo = total_stages, 0, time.monotonic(), echo
        self._last_training = (-1, -1.0)
        self._last_evaluation = (-1, -1)
        self.report_uri = None

    def _line(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.started:7.1f}s] {text}", flush=True)

    def stage(self, round_index: int, stage: str, resumed: bool) -> None:
        self._line(f"round {round_index}: {stage}" + (" (committed earlier, skipped)" if resumed else " ..."))

    def stage_done(self, round_index: int, stage: str, output: dict) -> None:
        self.done += 1
        counts = ", ".join(
            f"{k}={v}"
            for k, v in output.items()
            if k == "promoted" or (isinstance(v, (int, float)) and not isinstance(v, bool))
        )
        of = f"{self.done}/{self.total} stages" if self.total else f"{self.done} stages, continuous"
        self._line(f"round {round_index}: {stage} done ({of}){': ' + counts if counts else ''}")

    def training(self, round_index: int, step: int, total: int, loss: float) -> None:
        # a line every 10% of the steps (or every step of a short run), not every poll
        every = max(total // 10, 1)
        if step != self._last_training[0] and (step % every == 0 or step == total):
            self._last_training = (step, loss)
            if total:
                self._line(f"round {round_index}: training step {step}/{total}, loss {loss:.4f}")
            else:  # the job is queued or its workers are loading the model and the data: no steps known yet
                self._line(f"round {round_index}: training job starting")

    def evaluation(self, round_index: int, done: int, total: int) -> None:
        if (round_index, done) != self._last_evaluation:  # shards report their sums; a line per new count
            self._last_evaluation = (round_index, done)
            self._line(f"round {round_index}: evaluated {done}/{total} instances")

    def report(self, uri: str) -> None:
        self.report_uri = uri
        self._line(f"report: {uri}")


def _summary_rows(manifest: dict) -> tuple[list[str], list[list[str]]]:
    columns = [
        "round",
        "instr.",
        "w/ inst.",
        "kept",
        "removed (rule=n)",
        "backtr. kept",
        "train ex.",
        "loss",
        "score",
        "NLL",
        "words",
        "promoted",
    ]
    rows = []
    for row in summarize(manifest):
        funnel = ", ".join(f"{k}={v}" for k, v in (row.funnel or {}).items()) or ("-" if row.round == 0 else "none")
        fmt = lambda v, f="{}": "-" if v is None else f.format(v)  # noqa: E731
        rows.append(
            [
                str(row.round),
                fmt(row.instructions),
                fmt(row.with_instances),
                fmt(row.kept),
                funnel,
                fmt(row.augmented_kept),
                fmt(row.train_examples),
                fmt(row.final_loss, "{:.3f}"),
                fmt(row.score, "{:.4f}"),
                fmt(row.nll, "{:.4f}"),
                fmt(row.answer_words, "{:.0f}"),
                fmt(row.promoted),
            ]
        )
        if row.control is not None:
            c = row.control
            rows.append(
                ["control", "-", "-", "-", "seeds only", "-", "-", "-"]
                + [f"{c.score:.4f}", f"{c.nll:.4f}", f"{c.answer_words:.0f}", "-"]
            )
    return columns, rows


def _bounds(values: list[float], digits: int = 3) -> str:
    estimate, low, high = values
    return f"{estimate:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def _gate_lines(manifest: dict) -> list[str]:
    """Per round: what the gate decided on, both intervals, and the smallest effect it could see."""
    lines = []
    for r in rounds_of(manifest):
        decision = r.get("promote", Decision)
        if decision is None or not decision.comparisons:
            continue
        lines.append(
            f"round {r.index} gate ({decision.metric}, {decision.interval} {decision.confidence:.0%} intervals): "
            + ("promoted" if decision.promoted else "not promoted")
        )
        for g in decision.gates():
            lines.append(
                f"  vs {g.against}: {decision.metric} gain {_bounds(g.gain)} (detects >= {g.gain_mde:.3f}); "
                f"score {_bounds(g.score_difference)} (detects >= {g.score_mde:.3f}); "
                f"at equal length {_bounds(g.length_controlled_score_difference)}: "
                + ("passed" if g.passed else "failed")
            )
        passed = {g.against: g.passed for g in decision.gates()}
        if passed.get("incumbent") and passed.get("control") is False:
            lines.append(
                "  it beat the incumbent but not the seeds-only control: the machine data added nothing it could see"
            )
    return lines


def _test_line(manifest: dict) -> str | None:
    """The run's honest numbers: model 0, the control and the final model on test tasks that chose
    nothing."""
    tests = [test for r in rounds_of(manifest) if (test := r.get("test", Tested)) is not None]
    if not tests:
        return None
    test = tests[-1]
    estimate, low, high = test.difference
    words = test.answer_words
    line = (
        f"test ({test.num_tasks} held-out tasks that chose nothing): model 0 {test.model_0_score:.4f}, "
        f"final model {test.final_score:.4f}, difference {estimate:+.4f} "
        f"({test.confidence:.0%} interval {low:+.4f} to {high:+.4f})"
    )
    if test.nll_gain:
        line += f"; NLL gain {_bounds(test.nll_gain)}"
    if words:
        line += "; answer words " + ", ".join(f"{name} {n:.0f}" for name, n in words.items())
    if test.over_control:
        line += f"\n  final over the seeds-only control: score {_bounds(test.over_control)}"
        if test.nll_gain_over_control:
            line += f", NLL gain {_bounds(test.nll_gain_over_control)}"
        if test.final_model == test.model_0:
            line += " (no round was promoted: the machine data added nothing the gate could see)"
    results = test.benchmark_results()
    for task in dict.fromkeys(b.task for b in results):  # standard benchmarks: each metric, each model
        for metric in next(b for b in results if b.task == task).metrics:
            values = [
                f"{b.model} {b.metrics[metric]:.4f}" + (f" ± {b.stderrs[metric]:.4f}" if metric in b.stderrs else "")
                for b in results
                if b.task == task and metric in b.metrics
            ]
            line += f"\n  benchmark {task} {metric}: " + ", ".join(values)
    return line


def _print_summary(manifest: dict) -> None:
    columns, rows = _summary_rows(manifest)
    if console.is_terminal:
        table = Table(title=f"run {manifest['run_id']}")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]  # never cut a cell
        for line in [columns, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    for line in _gate_lines(manifest):
        print(line)
    test = _test_line(manifest)
    if test:
        print(test)


def _user_error(exc: BaseException) -> str | None:
    """One line for errors a user can fix (a bad config value, a model that cannot be had); None for
    anything else, which keeps its traceback."""
    import grpc

    from services.common.models import ModelUnavailable

    if isinstance(exc, grpc.RpcError) and exc.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return exc.details()
    if isinstance(exc, (ModelUnavailable, ConfigError)):
        return str(exc)
    return None


@app.command()
def run(
    config: Path | None = typer.Option(Path("configs/local.yaml"), help="YAML config"),
    run_id: str = typer.Option("demo", help="Run id; rerunning the same id resumes it"),
    rounds: int | None = typer.Option(None, help="Override loop.rounds"),
    store_root: str | None = typer.Option(None, help="Override store.root"),
    verbose: bool = typer.Option(False, help="Log every stage"),
):
    """Start (or join RAY_ADDRESS) Ray, deploy the four apps, run the configured rounds."""
    from ray import serve

    from services.client import ServiceClients
    from services.common.store import RunStore
    from services.serving import connect_ray, deploy_apps

    cfg = _load(config if config and config.exists() else None, store_root, rounds)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    started = time.time()
    if not console.is_terminal:
        print("starting Ray and deploying generator, filter, trainer, evaluator ...", flush=True)
    with console.status("starting Ray and deploying generator, filter, trainer, evaluator ..."):
        started_ray = connect_ray()
        deploy_apps(cfg)
    console.print(
        f"[green]apps up[/green]: gRPC {cfg.serve.host}:{cfg.serve.grpc_port} "
        f"(reflection on; metadata application=generator|filter|trainer|evaluator)"
    )
    corpus = cfg.backtranslation.corpus
    if cfg.backtranslation.enabled and isinstance(corpus, str) and corpus in BUILTIN_CORPORA:
        console.print(
            f"backtranslation corpus: {BUILTIN_CORPORA[corpus]} (offline everywhere; "
            "set backtranslation.corpus to your own prose for data that fits the method best)"
        )
    clients = ServiceClients(f"{cfg.serve.host}:{cfg.serve.grpc_port}", cfg.serve.request_timeout_s)
    total = stage_count(cfg)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    try:
        if console.is_terminal:
            with Progress(*columns, console=console) as progress:
                reporter = RichReporter(progress, total)
                manifest = LoopDriver(cfg, clients, run_id, reporter).run()
        else:
            reporter = PlainReporter(total)
            manifest = LoopDriver(cfg, clients, run_id, reporter).run()
    except Exception as exc:
        message = _user_error(exc)
        if message is None:
            raise
        console.print(f"[red]error:[/red] {message}", soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        clients.close()
        if started_ray:
            serve.shutdown()
    _print_summary(manifest)
    console.print(
        f"run store: [bold]{RunStore(cfg.store.root).uri(run_id)}[/bold] "
        f"(manifest.json lists every dataset and checkpoint); {time.time() - started:.0f}s"
    )
    if reporter.report_uri:
        console.print(f"report: [bold]{reporter.report_uri}[/bold]")
    if (tracked := manifest.get("mlflow") or {}).get("run_id"):
        look = f"; to look: {tracked['ui']}" if tracked.get("ui") else ""
        console.print(f"MLflow: run {tracked['run_id']} in {tracked['tracking_uri']}{look}", soft_wrap=True)


@app.command("serve")
def serve_command(config: Path | None = typer.Option(Path("configs/local.yaml"), help="YAML config")):
    """Deploy the four apps (on RAY_ADDRESS if set, else a local Ray) and stay up until interrupted."""
    from ray import serve

    from services.serving import APP_NAMES, connect_ray, deploy_apps

    cfg = _load(config if config and config.exists() else None)
    stop = threading.Event()
    started_ray = connect_ray()
    try:
        deploy_apps(cfg)
        console.print(
            f"[green]serving[/green] gRPC on {cfg.serve.host}:{cfg.serve.grpc_port} "
            f"(apps: {', '.join(APP_NAMES)}); Ctrl-C to stop"
        )
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:  # Ctrl-C while the apps were still deploying
        pass
    finally:
        console.print("shutting down what this command started ...")
        if started_ray:
            serve.shutdown()
        else:
            for name in APP_NAMES:
                serve.delete(name)


@app.command("filter")
def filter_command(
    input_path: Path = typer.Argument(..., help="JSONL/JSON/Parquet records with an 'instruction' field"),
    output: Path = typer.Option(..., "-o", "--output", help="Kept records (JSONL, input order)"),
    pool: Path | None = typer.Option(None, help="Instructions already pooled (e.g. seed tasks)"),
    threshold: float = typer.Option(
        _FILTER.rouge_l_threshold, min=0.0, max=1.0, help="Keep only if max ROUGE-L F < threshold"
    ),
    rejected: Path | None = typer.Option(None, help="Write rejected records with reasons here"),
    reference_rule: bool = typer.Option(False, help="Drop only F > threshold, as Self-Instruct's code does"),
    instruction_rules: bool = typer.Option(True, help="Self-Instruct's length, keyword and punctuation rules"),
    near_duplicates: bool = typer.Option(True, help="Drop near-duplicate responses (MinHash)"),
    decontaminate_against: Path | None = typer.Option(
        None, help="Evaluation tasks: drop records sharing a long n-gram with them"
    ),
):
    """Self-Instruct's filter on your own data: ROUGE-L novelty, keyword and length rules, dedup.
    Switch rules off (--no-instruction-rules --no-near-duplicates) to keep the ROUGE-L filter alone."""

    from pydantic import ValidationError

    from services.common.formats import DataFormatError
    from services.filter.files import filter_file

    try:
        settings = type(_FILTER).model_validate(
            {
                **_FILTER.model_dump(),
                "rouge_l_threshold": threshold,
                "reject_only_above_threshold": reference_rule,
                "instruction_rules": instruction_rules,
                **({} if near_duplicates else {"near_duplicate_threshold": 0.0}),
            }
        )
    except ValidationError as exc:
        console.print(f"[red]{exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}[/red]")
        raise typer.Exit(2) from None
    columns = (TextColumn("filtering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("filter", total=None)
            result = filter_file(
                input_path,
                output,
                pool,
                settings,
                rejected,
                on_progress=lambda: progress.advance(task),
                eval_path=decontaminate_against,
            )
    except DataFormatError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    console.print(f"kept {len(result.kept)} of {len(result.verdicts)} -> {output}")
    for rule, count in sorted(result.funnel.items(), key=lambda kv: -kv[1]):
        console.print(f"  removed by {rule}: {count}")


@app.command()
def report(
    run_id: str,
    output: Path | None = typer.Option(None, "-o", "--output", help="Default: <store>/<run>/report.html"),
    config: Path | None = typer.Option(Path("configs/local.yaml"), help="YAML config"),
    store_root: str | None = typer.Option(None, help="Override store.root"),
):
    """Write a run's self-contained HTML report (funnel, ROUGE-L, lengths, verbs, loss, scores, promotions)."""
    from services.common.store import RunStore

    from .report import build_report, write_report

    cfg = _load(config if config and config.exists() else None, store_root)
    store = RunStore(cfg.store.root)
    if not store.load_manifest(run_id)["rounds"]:
        console.print(f"[red]no run {run_id!r} in {store.uri()}[/red]")
        raise typer.Exit(2) from None
    if output:
        output.write_text(build_report(store, run_id))
        console.print(f"wrote {output}")
    else:
        console.print(f"wrote {write_report(store, run_id)}")


def _store_and_manifest(run_id: str, config: Path | None, store_root: str | None):
    from services.common.store import RunStore, check_run_id

    if (why := check_run_id(run_id)) is not None:
        console.print(f"[red]{run_id!r} is no run id: it {why}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    cfg = _load(config if config and config.exists() else None, store_root)
    store = RunStore(cfg.store.root)
    manifest = store.load_manifest(run_id)
    if not manifest["rounds"]:
        console.print(f"[red]no run {run_id!r} in {store.uri()}[/red]")
        raise typer.Exit(2) from None
    return store, manifest


@app.command()
def status(
    run_id: str,
    config: Path | None = typer.Option(Path("configs/local.yaml"), help="YAML config"),
    store_root: str | None = typer.Option(None, help="Override store.root"),
):
    """Where a run stands, while it runs or after: its state, the last stage committed, the model it
    stands on, and one row per round."""
    store, manifest = _store_and_manifest(run_id, config, store_root)
    last = max(
        ((r.index, name, at) for r in rounds_of(manifest) for name, at in r.committed_at.items()),
        key=lambda item: item[2],
    )
    ago = time.time() - last[2]
    console.print(f"run {run_id}: {manifest.get('status', 'unknown')}", soft_wrap=True)
    console.print(f"  last committed: round {last[0]} {last[1]} ({ago:.0f}s ago)", soft_wrap=True)
    console.print(f"  promoted model: {manifest.get('promoted_model', '-')}", soft_wrap=True)
    if store.stop_requested(run_id) and manifest.get("status") == "running":
        console.print("  stop requested: it ends after the round in progress")
    if manifest.get("stopped_because"):
        console.print(f"  stopped because: {manifest['stopped_because']}", soft_wrap=True)
    _print_summary(manifest)


@app.command()
def stop(
    run_id: str,
    config: Path | None = typer.Option(Path("configs/local.yaml"), help="YAML config"),
    store_root: str | None = typer.Option(None, help="Override store.root"),
):
    """Ask a running loop (continuous or not) to end after the round in progress; it then runs the
    test stage and writes its report. `reinstruct run` with the same id goes on from there."""
    store, manifest = _store_and_manifest(run_id, config, store_root)
    if manifest.get("status") != "running":
        console.print(f"run {run_id} is not running ({manifest.get('status', 'unknown')}): nothing to stop")
        raise typer.Exit(1)
    store.request_stop(run_id)  # a file of its own: the driver alone writes the manifest
    console.print(f"asked run {run_id} to stop after its current round")


@app.command()
def export(
    run_id: str,
    output: Path = typer.Option(..., "-o", "--output", help=".jsonl (Alpaca) or .parquet (chat messages)"),
    config: Path | None = typer.Option(Path("configs/local.yaml"), help="YAML config"),
    store_root: str | None = typer.Option(None, help="Override store.root"),
):
    """Export every task kept in a run (Self-Instruct's and backtranslation's), for other training tools."""
    from services.common.formats import export_alpaca_jsonl, export_chat_parquet
    from services.common.store import RunStore

    cfg = _load(config if config and config.exists() else None, store_root)
    store = RunStore(cfg.store.root)
    manifest = store.load_manifest(run_id)
    tasks = [
        task
        for r in rounds_of(manifest)
        for name in ("filter", "filter_augmented")
        if (kept := r.get(name, Filtered)) is not None
        for task in kept.kept(store)
    ]
    writer = export_chat_parquet if output.suffix == ".parquet" else export_alpaca_jsonl
    count = writer(tasks, output)
    console.print(f"wrote {count} examples from {len(tasks)} tasks to {output}")


if __name__ == "__main__":
    app()
