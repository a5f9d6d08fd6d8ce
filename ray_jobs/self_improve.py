"""The self-improvement loop driver. Round k generates with model k, filters, trains model k+1,
evaluates it, and promotes it only if it is better. It talks to the services over gRPC only and
records every stage in the run store; a committed stage is never redone, so a rerun resumes.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.self_improve --config configs/local.yaml --run-id my-run
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ray_jobs.manifest import (
    Dataset,
    Decision,
    Evaluated,
    Filtered,
    Gate,
    Instructions,
    Judged,
    Split,
    Tested,
    Trained,
    TrainMix,
    rounds_of,
)
from ray_jobs.meta_tasks import build_meta_tasks
from ray_jobs.report import write_report
from ray_jobs.seed_split import split_by_task
from services.client import ServiceClients
from services.common.config import ReinstructConfig, load_config, parse_config
from services.common.formats import load_seed_tasks, load_tasks
from services.common.records import TaskRecord
from services.common.store import RunStore, StoreError
from services.generator.backtranslation import curation_meta_tasks

from . import backtranslation_stages as bt_stages
from . import model_stages
from . import self_instruct_stages as si_stages
from .run import Reporter, Run
from .tracking import TrackingReporter

__all__ = ["LoopDriver", "Reporter", "main", "stage_count", "summarize"]

log = logging.getLogger("reinstruct.loop")

SELF_INSTRUCT_STAGES = ("generate_instructions", "classify", "generate_instances", "filter")
BACKTRANSLATION_STAGES = (
    "segments",
    "backtranslate",
    "rating_pool",
    "curate",
    "curation_control",
    "filter_augmented",
)
TRAIN_STAGES = ("train_data", "train", "evaluate", "promote")  # plus "judge" when evaluation.judge is on
BOOTSTRAP_STAGES = ("split", "train_data", "train", "evaluate", "promote")
BASE_MODEL_STAGES = ("split", "evaluate", "promote")  # no bootstrap: the base model is model 0
BACKWARD_STAGES = ("backward_data", "backward_train")
CONTROL_STAGES = ("control_data", "control_train", "control_evaluate")


def stage_count(config: ReinstructConfig) -> int | None:
    """How many stages a run has (progress bars); None for a continuous run (loop.rounds 0)."""
    if config.loop.rounds == 0:
        return None
    bt = config.backtranslation.enabled
    per_round = len(SELF_INSTRUCT_STAGES) + len(TRAIN_STAGES) + (len(BACKTRANSLATION_STAGES) if bt else 0)
    per_round += 1 if config.evaluation.judge else 0
    final = 1 if config.evaluation.test_fraction else 0  # the test stage
    first = (len(BOOTSTRAP_STAGES) if config.loop.bootstrap else len(BASE_MODEL_STAGES)) + (
        len(BACKWARD_STAGES) if bt else 0
    )
    first += len(CONTROL_STAGES) if config.loop.control else 0
    return first + config.loop.rounds * per_round + final


@dataclass
class LoopDriver:
    config: ReinstructConfig
    clients: ServiceClients
    run_id: str
    reporter: Reporter = field(default_factory=Reporter)

    def __post_init__(self) -> None:
        # every committed stage also goes to the experiment tracker (tracking.*); it never fails a run
        self.reporter = TrackingReporter.around(self.reporter, self.config, self.run_id)
        self.run_state = Run(self.config, self.clients, self.run_id, self.reporter)
        self.store = self.run_state.store

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Round 0 (the split, model 0, the control, the backward model), then rounds until a stop
        condition, then the test stage. Every stage committed earlier is skipped, so a rerun resumes;
        a resumed run continues its MLflow run."""
        with self.reporter.session():
            self._run()
        return self.store.load_manifest(self.run_id)

    def _run(self) -> None:
        run = self.run_state
        run.claim()  # the run's owner and key, before anything else
        if self.store.remove_stale_temporaries(self.run_id):
            log.info("removed temporary files a killed run left behind")
        started = self.store.load_manifest(self.run_id).get("started_at") or time.time()
        self.store.update_run(self.run_id, config=self.config.model_dump(), status="running", started_at=started)
        self.store.clear_stop(self.run_id)  # a stop asked of an earlier driver is spent: this one goes on
        seeds = load_seed_tasks(self.config.seeds.path)  # a malformed file fails here, before any stage
        for path in self.config.evaluation.extra_sets:
            load_tasks(path)
        if self.config.evaluation.benchmarks:  # the test stage runs them: a wrong task fails now, not then
            model_stages.check_benchmarks(run)
        split = run.stage(0, "split", lambda: self._split(seeds), Split)
        promoted = self._model_0(split)
        control = self._control(split) if self.config.loop.control else None
        backward = bt_stages.backward_model(run, split) if self.config.backtranslation.enabled else None
        k, rounds_without_promotion = 0, 0
        while (stop := self._stop_reason(k, rounds_without_promotion)) is None:
            k += 1
            promoted = self._round(k, split, promoted, backward, control)
            rounds_without_promotion = 0 if promoted.promoted else rounds_without_promotion + 1
        log.info("stopping after round %d: %s", k, stop)
        if split.test_tasks:
            first = run.committed(0, "evaluate", Evaluated).model_uri
            control_uri = control.model_uri if control else None
            run.stage(
                k, "test", lambda: model_stages.test(run, k, split, first, promoted.model_uri, control_uri), Tested
            )
        self.store.update_run(self.run_id, status="succeeded", final_model=promoted.model_uri, stopped_because=stop)
        self._write_report()

    def _model_0(self, split: Split) -> Decision:
        """The base model itself (evaluated like every later model, so round 1 must beat it), or with
        loop.bootstrap the base model fine-tuned on the seed tasks."""
        run = self.run_state
        model = self.config.model.base
        if self.config.loop.bootstrap:
            data = run.stage(0, "train_data", lambda: self._train_mix(0, split, [], []), TrainMix)
            epochs = self.config.training.bootstrap_epochs
            model = run.stage(
                0, "train", lambda: model_stages.train(run, 0, model, data.uri, epochs), Trained
            ).model_uri
        score = run.stage(0, "evaluate", lambda: model_stages.evaluate(run, 0, model, split.seed_dev_uri), Evaluated)
        decision = run.stage(0, "promote", lambda: model_stages.promote(run, 0, score, None), Decision)
        self._promoted(decision)
        self._write_report()
        return decision

    def _control(self, split: Split) -> Evaluated:
        """The seeds-only control: the base model fine-tuned on the seed tasks alone with the rounds'
        recipe, once per run, evaluated on dev like every round. What a round adds over it is what
        the machine data is worth (Self-Instruct's and Humpback's own comparison)."""
        run = self.run_state
        data = run.stage(0, "control_data", lambda: self._train_mix(0, split, [], [], name="control_mix"), TrainMix)
        output = self.store.uri(self.run_id, "round-000", "control_model")
        epochs = self.config.training.epochs
        base = self.config.model.base
        trained = run.stage(
            0, "control_train", lambda: model_stages.train(run, 0, base, data.uri, epochs, output_uri=output), Trained
        )
        return run.stage(
            0,
            "control_evaluate",
            lambda: model_stages.evaluate(run, 0, trained.model_uri, split.seed_dev_uri, stage="control_evaluate"),
            Evaluated,
        )

    def _round(
        self, k: int, split: Split, promoted: Decision, backward: str | None, control: Evaluated | None
    ) -> Decision:
        """Round k: model k writes tasks, the filter keeps the novel ones, backtranslation adds the
        best-rated pairs, model k+1 is trained, evaluated and promoted only if it is better."""
        run, model = self.run_state, promoted.model_uri
        machine = self._machine_pool(k)
        instructions = run.stage(
            k,
            "generate_instructions",
            lambda: si_stages.generate_instructions(run, k, model, split, machine),
            Instructions,
        )
        if instructions.count == 0:
            log.warning("round %d: the model wrote no parseable instructions; this round adds no data", k)
        classified = run.stage(k, "classify", lambda: si_stages.classify(run, k, model, instructions), Dataset)
        candidates = run.stage(
            k, "generate_instances", lambda: si_stages.generate_instances(run, k, model, split, classified), Dataset
        )
        kept = run.stage(k, "filter", lambda: si_stages.filter_candidates(run, k, split, machine, candidates), Filtered)
        augmented: list[TaskRecord] = []
        if backward is not None:
            bt_stages.backtranslation_round(run, k, model, backward, split.seed_heldout_uri)
            # rescoring: this round's ratings alone choose the augmented set; else every round's choice adds up
            rounds = [k] if self.config.backtranslation.rescore_all else range(1, k + 1)
            augmented = [t for j in rounds for t in run.committed(j, "filter_augmented", Filtered).kept(self.store)]
        data = run.stage(
            k, "train_data", lambda: self._train_mix(k, split, machine + kept.kept(self.store), augmented), TrainMix
        )
        start_from = self.config.model.base if self.config.training.from_base else model
        epochs = self.config.training.epochs
        trained = run.stage(k, "train", lambda: model_stages.train(run, k, start_from, data.uri, epochs), Trained)
        if run.committed(k, "promote", Decision) is None:
            self._check_checkpoint(k, trained)
        score = run.stage(
            k, "evaluate", lambda: model_stages.evaluate(run, k, trained.model_uri, split.seed_dev_uri), Evaluated
        )
        if self.config.evaluation.judge:
            run.stage(k, "judge", lambda: model_stages.judge(run, k, promoted, score, split.seed_dev_uri), Judged)
        decision = run.stage(k, "promote", lambda: model_stages.promote(run, k, score, promoted, control), Decision)
        self._promoted(decision)
        self._write_report()
        return decision

    def _stop_reason(self, rounds_done: int, rounds_without_promotion: int) -> str | None:
        """Why no further round starts, or None. A run with loop.rounds > 0 stops after them; a
        continuous one (0) when `reinstruct stop` asked it to, after loop.patience rounds without a
        promotion, or once loop.time_budget_s has passed since the run first started."""
        loop = self.config.loop
        manifest = self.store.load_manifest(self.run_id)
        if self.store.stop_requested(self.run_id):
            return "stop requested"
        if loop.rounds:
            return f"{loop.rounds} rounds done" if rounds_done >= loop.rounds else None
        if rounds_without_promotion >= loop.patience:
            return f"no promotion in {loop.patience} rounds in a row"
        if loop.time_budget_s and time.time() - manifest.get("started_at", time.time()) >= loop.time_budget_s:
            return f"time budget of {loop.time_budget_s:.0f}s spent"
        return None

    # ---- data the stages share -------------------------------------------------------------------
    def _machine_pool(self, up_to_round: int) -> list[TaskRecord]:
        """Everything a filter stage kept in rounds 1 .. up_to_round-1."""
        return [
            t for k in range(1, up_to_round) for t in self.run_state.committed(k, "filter", Filtered).kept(self.store)
        ]

    def _split(self, seeds: list[TaskRecord]) -> Split:
        """Seed tasks split by task into train and held-out; held-out into dev (the gate decides on it)
        and test (nothing decides on it: evaluated once, at the end)."""
        s, run = self.config.seeds, self.run_state
        train, heldout = split_by_task(seeds, s.heldout_fraction, s.split_seed)
        for path in self.config.evaluation.extra_sets:  # user evaluation sets: held out as whole tasks too
            heldout += [replace(t, id=f"{Path(path).stem}:{t.id}") for t in load_tasks(path)]
        dev, test = (
            split_by_task(heldout, self.config.evaluation.test_fraction, s.split_seed + 1)
            if self.config.evaluation.test_fraction
            else (heldout, [])
        )
        return Split(
            seed_train_uri=run.write(0, "seed_train", train).uri,
            seed_heldout_uri=run.write(0, "seed_heldout", heldout).uri,
            seed_dev_uri=run.write(0, "seed_dev", dev).uri,
            seed_test_uri=run.write(0, "seed_test", test).uri,
            seed_all_uri=run.write(0, "seed_all", seeds).uri,
            train_tasks=len(train),
            heldout_tasks=len(heldout),
            dev_tasks=len(dev),
            test_tasks=len(test),
            dev_task_ids=sorted(t.id for t in dev),
            test_task_ids=sorted(t.id for t in test),
        )

    def _train_mix(
        self, k: int, split: Split, machine: list[TaskRecord], augmented: list[TaskRecord], name: str = "train_mix"
    ) -> TrainMix:
        human = self.run_state.seed_training_tasks(split)
        meta = []
        if self.config.training.meta_tasks:  # teach the Self-Instruct and rating formats themselves
            meta = build_meta_tasks(
                human,
                machine,
                seed=self.config.seed + k,
                examples_per_task=self.config.training.bootstrap_examples_per_task,
            )
            if self.config.backtranslation.enabled:  # the forward model also rates pairs (self-curation)
                meta += curation_meta_tasks(human, seed=self.config.seed + k)
        mix = self.run_state.write(k, name, human + machine + augmented + meta)
        return TrainMix(
            uri=mix.uri,
            count=mix.count,
            seed=len(human),
            machine=len(machine),
            augmented=len(augmented),
            meta=len(meta),
        )

    def _check_checkpoint(self, k: int, trained: Trained) -> None:
        """Before a trained model is evaluated and can be promoted: it is the checkpoint whose digest
        the train stage recorded (the trainer's, from the job that committed it)."""
        if trained.model_digest and self.store.tree_digest(trained.model_uri) != trained.model_digest:
            raise StoreError(
                f"{trained.model_uri} is not the checkpoint round {k}'s training committed (its digest is in "
                "the manifest): it is never evaluated or promoted"
            )

    def _promoted(self, decision: Decision) -> None:
        """The model the loop stands on now, for `reinstruct status` and the OpenAI endpoint's run:<id>."""
        self.store.update_run(self.run_id, promoted_model=decision.model_uri)

    def _write_report(self) -> None:
        self.reporter.report(write_report(self.store, self.run_id))


@dataclass
class RoundSummary:
    """One row of the per-round table; None where the round has no such stage."""

    round: int
    instructions: int | None
    with_instances: int | None
    kept: int | None
    funnel: dict[str, int] | None
    augmented_kept: int | None
    train_examples: int | None
    final_loss: float | None
    rouge_l: float | None
    score: float | None
    nll: float | None
    answer_words: float | None
    promoted: bool | None
    gates: list[Gate] | None  # the gate's comparisons (the incumbent, the control)
    control: Evaluated | None  # round 0: the seeds-only control on dev


def summarize(manifest: dict) -> list[RoundSummary]:
    """One row per round: generated, kept by each filter, train loss, eval score, promotion."""
    rows = []
    for r in rounds_of(manifest):
        instructions = r.get("generate_instructions", Instructions)
        candidates, kept = r.get("generate_instances", Dataset), r.get("filter", Filtered)
        augmented, data = r.get("filter_augmented", Filtered), r.get("train_data", TrainMix)
        trained, score, decision = r.get("train", Trained), r.get("evaluate", Evaluated), r.get("promote", Decision)
        control = r.get("control_evaluate", Evaluated)
        rows.append(
            RoundSummary(
                round=r.index,
                instructions=instructions and instructions.count,
                with_instances=candidates and candidates.count,
                kept=kept and kept.kept_count,
                funnel=kept and kept.funnel,
                augmented_kept=augmented and augmented.kept_count,
                train_examples=data and data.count,
                final_loss=trained and trained.final_loss,
                rouge_l=score and score.rouge_l,
                score=score and score.score,
                nll=score and score.nll,
                answer_words=score and score.answer_words,
                promoted=decision and decision.promoted,
                gates=decision and decision.gates(),
                control=control,
            )
        )
    return rows


def refuse_store_inside_job_package(root: str) -> None:
    """Under `ray job submit --working-dir`, the working directory is Ray's unpacked package
    (.../runtime_resources/working_dir_files/_ray_pkg_<hash>/): a relative store root would put the
    whole run there, invisible to the user and lost to the next cluster session."""
    if "://" in root or os.path.isabs(os.path.expanduser(root)):
        return
    if "_ray_pkg_" in os.getcwd():
        raise SystemExit(
            f"store.root {root!r} is relative, and this driver runs inside Ray's job package "
            f"({os.getcwd()}): give an absolute path every process of the run can reach (a shared "
            "volume on a multi-node cluster) or an object-store URI, e.g. --store-root /data/runs"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: every built-in default)")
    parser.add_argument(
        "--settings-b64",
        default=None,
        help="the settings every Serve app got (base64 JSON, as the Helm chart passes them); instead of --config",
    )
    parser.add_argument("--run-id", default="demo")
    parser.add_argument("--rounds", type=int, default=None, help="override loop.rounds")
    parser.add_argument("--store-root", default=None, help="override store.root")
    parser.add_argument("--no-deploy", action="store_true", help="use apps already deployed (e.g. a RayService)")
    parser.add_argument("--grpc-target", default=None, help="host:port of Serve's gRPC proxy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.settings_b64:
        config = parse_config(json.loads(base64.b64decode(args.settings_b64)), "--settings-b64")
    else:
        config = load_config(args.config)
    if args.rounds is not None:
        config.loop.rounds = args.rounds
    if args.store_root is not None:
        config.store.root = args.store_root
    refuse_store_inside_job_package(config.store.root)
    from services.serving import connect_ray, deploy_apps

    connect_ray()
    if not args.no_deploy:
        deploy_apps(config)
    target = args.grpc_target or f"{config.serve.host}:{config.serve.grpc_port}"
    clients = ServiceClients(target, config.serve.request_timeout_s)
    manifest = LoopDriver(config, clients, args.run_id).run()
    for row in summarize(manifest):
        print(asdict(row))
    print(f"run store: {RunStore(config.store.root).uri(args.run_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
