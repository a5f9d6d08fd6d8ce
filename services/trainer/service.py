"""The trainer's logic: one Ray Train run per (run, round), submitted as a Ray job.

A job's submission id is random (nobody can name another run's job), and the trainer records it
beside the output (`.<output>.job.json`), so a repeated StartTraining call (a client retry, a resumed
loop driver, a redeployed trainer replica) attaches to the job already running or finished instead of
starting a twin (the request holds the output's lock meanwhile: check_output_uri). Status comes from
Ray's job API plus a progress file the training loop writes beside the checkpoint; a cancel file asks
the loop to stop. When the job commits the checkpoint it records the checkpoint's digest
(`.<job>.commit.json`); a checkpoint found at an output without that record, or that no longer
matches it, is never reported as trained (nobody adopts a model its run did not train). Every file
goes through the run store, so a store on an object-store URI works as a local one does.
"""

from __future__ import annotations

import posixpath
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field

from ..common.config import ModelConfig, ServeConfig, TrainingConfig
from ..common.grpc_handler import API_TOKEN_ENV
from ..common.models import DEFAULT_CACHE_DIR
from ..common.store import RunStore
from ..common.validation import Overloaded, RequestError
from .loss_log import LossTarget
from .placement import worker_needs
from .spec import TrainingJobSpec

_JOB_STATES = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "SUCCEEDED",
    "FAILED": "FAILED",
    "STOPPED": "CANCELLED",
}


_DEFAULTS = TrainingConfig()  # the one set of defaults (services/common/config.py)


def _amounts(resources: dict) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items())


@dataclass
class TrainingJob:
    job_id: str
    model_uri: str
    state: str = "PENDING"  # PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED
    step: int = 0
    total_steps: int = 0
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    error: str = ""
    progress_uri: str = ""
    cancel_uri: str = ""
    real_token_share: float = 0.0
    resumed_from_step: int = 0
    run_id: str = ""  # the run the job trains for: only that run's key sees or cancels it
    model_digest: str = ""  # set once SUCCEEDED: the checkpoint's digest its job committed


class TrainerService:
    def __init__(
        self,
        store: RunStore,
        trust_remote_code: bool = False,
        builtin_cache_dir: str = DEFAULT_CACHE_DIR,
        job_address: str | None = None,
        prompt_format: str = ModelConfig().prompt_format,
        seed_tag: str = "",
        max_active_jobs: int = ServeConfig().max_training_jobs,
        start_timeout_s: float = _DEFAULTS.start_timeout_s,
    ) -> None:
        self.store = store
        self.start_timeout_s = start_timeout_s
        self.max_active_jobs = max_active_jobs
        self.prompt_format = prompt_format
        self.seed_tag = seed_tag
        self.trust_remote_code = trust_remote_code
        self.builtin_cache_dir = builtin_cache_dir
        self.job_address = job_address
        self._client = None
        self._models: dict[str, str] = {}

    @property
    def client(self):
        if self._client is None:
            import ray
            from ray.job_submission import JobSubmissionClient

            address = self.job_address
            if address is None and ray.is_initialized():
                # this process's own cluster: with no address Ray takes the newest cluster started on this
                # machine (/tmp/ray), which is another one wherever several run side by side
                address = ray.get_runtime_context().gcs_address
            self._client = JobSubmissionClient(address)
        return self._client

    def _uris(self, job_id: str, model_uri: str) -> tuple[str, str, str]:
        """The job's spec, progress and cancel files, beside its checkpoint in the store."""
        return tuple(
            self.store.beside(model_uri, f".{job_id}.{kind}") for kind in ("spec.json", "progress.json", "cancel")
        )

    def _job_record_uri(self, model_uri: str) -> str:
        """Which job trains model_uri now (written before it is submitted)."""
        return self.store.beside(model_uri, f".{posixpath.basename(self.store.resolve(model_uri))}.job.json")

    def _committed(self, model_uri: str) -> TrainingJob | None:
        """The job that committed the checkpoint at model_uri (its commit record, written by the job
        after the commit), if the checkpoint is still what it committed; else None."""
        try:
            job_id = self.store.read_json(self._job_record_uri(model_uri))["job_id"]
            record = self.store.read_json(commit_record_uri(self.store, job_id, model_uri))
        except (OSError, ValueError, KeyError):
            return None
        if record.get("model_uri") != model_uri or record.get("digest") != self.store.tree_digest(model_uri):
            return None
        job = TrainingJob(job_id, model_uri, state="SUCCEEDED", model_digest=record["digest"])
        job.run_id = self._run_of_uri(model_uri)
        self._read_progress(job, self._uris(job_id, model_uri)[1])
        return job

    def admit(self, run_id: str, model_uri: str) -> TrainingJob | None:
        """Before anything is written for a new job: the job that already trains (or trained) model_uri
        for this run, which a retry attaches to; None when a new one may start; refusals raise."""
        record_uri = self._job_record_uri(model_uri)
        if self.store.exists(record_uri):
            existing = self.status(self.store.read_json(record_uri).get("job_id", ""), run_id)
            if existing is not None and existing.state in ("PENDING", "RUNNING", "SUCCEEDED"):
                return existing  # a retry, a resumed driver or a redeployed replica attaches to the same job
        if any(self.store.exists(f"{model_uri}/{name}") for name in ("config.json", "adapter_config.json")):
            committed = self._committed(model_uri)
            if committed is None:
                raise RequestError(
                    "output_model_uri",
                    f"{model_uri!r} holds a checkpoint that no training job of this run committed (or one "
                    "changed since): it is never adopted; remove it to train there",
                )
            return committed  # committed earlier by this run's own job (Ray forgot the job since)
        running = self.active_jobs()
        if len(running) >= self.max_active_jobs:
            raise Overloaded(
                f"{len(running)} training runs are in progress (limit {self.max_active_jobs}, "
                "serve.max_training_jobs); try again when one ends"
            )
        return None

    def start(
        self,
        run_id: str,
        round_index: int,
        base_model: str,
        dataset_uri: str,
        model_uri: str,
        training: TrainingConfig,
        seed: int = 0,
        augmented_tag: str = "",
        loss_log: LossTarget | None = None,
    ) -> TrainingJob:
        admitted = self.admit(run_id, model_uri)
        if admitted is not None:
            return admitted
        record_uri = self._job_record_uri(model_uri)
        self.store.remove_staging(model_uri)  # a crash mid-training left it; it was never a model
        job_id = f"train-{secrets.token_hex(16)}"  # unguessable: a job is seen and controlled by its run only
        spec_uri, progress_uri, cancel_uri = self._uris(job_id, model_uri)
        spec = TrainingJobSpec(
            job_id=job_id,
            run_id=run_id,
            dataset_uri=dataset_uri,
            base_model=base_model,
            model_uri=model_uri,
            progress_uri=progress_uri,
            cancel_uri=cancel_uri,
            commit_uri=commit_record_uri(self.store, job_id, model_uri),
            trust_remote_code=self.trust_remote_code,
            builtin_cache_dir=self.builtin_cache_dir,
            prompt_format=self.prompt_format,
            seed_tag=self.seed_tag,
            seed=seed,
            augmented_tag=augmented_tag,
            training=training,
            loss_log=loss_log,
        )
        self.store.write_json(spec_uri, spec.model_dump(mode="json"))
        self.store.write_json(record_uri, {"job_id": job_id})
        self._models[job_id] = model_uri
        self._submit(job_id, spec_uri, model_uri, run_id, training)
        return self.status(job_id) or TrainingJob(job_id, model_uri, run_id=run_id)

    def _spec(self, job_id: str, model_uri: str) -> TrainingJobSpec | None:
        """The job's spec as start() wrote it (None when it cannot be read)."""
        try:
            return TrainingJobSpec.model_validate(self.store.read_json(self._uris(job_id, model_uri)[0]))
        except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
            return None

    def dataset_of(self, job: TrainingJob) -> str:
        """The dataset the job trains on ("" when its spec cannot be read)."""
        spec = self._spec(job.job_id, job.model_uri)
        return spec.dataset_uri if spec else ""

    def active_jobs(self) -> list[str]:
        """Training jobs of this cluster that are pending or running."""
        return [
            job.submission_id
            for job in self.client.list_jobs()
            if (job.submission_id or "").startswith("train-")
            and str(getattr(job.status, "value", job.status)) in ("PENDING", "RUNNING")
        ]

    def _submit(self, submission_id: str, spec_uri: str, model_uri: str, run_id: str, training: TrainingConfig) -> None:
        # OpenMP reads its wait policy once, as torch loads it: it must be in the workers' environment
        env = {"OMP_WAIT_POLICY": training.omp_wait_policy.upper()}
        for attempt in range(24):  # the head's job agent can take a few seconds to come up
            try:
                # this interpreter (the one Ray runs) rather than whatever `python` is on the job's PATH
                self.client.submit_job(
                    entrypoint=(
                        f"{shlex.quote(sys.executable)} -m services.trainer.job "
                        f"--store-root {shlex.quote(self.store.uri())} --spec {shlex.quote(spec_uri)}"
                    ),
                    submission_id=submission_id,
                    entrypoint_num_cpus=0,
                    metadata={"model_uri": model_uri, "run_id": run_id},
                    # training needs no API token; one inherited from the head would be readable by the
                    # job's code (a checkpoint's remote code) and anything it logs
                    runtime_env={"env_vars": {API_TOKEN_ENV: "", **env}},
                )
                return
            except RuntimeError as exc:
                if self._submitted(submission_id):  # a concurrent request submitted the same job first
                    return
                if "No available agent" not in str(exc) or attempt == 23:
                    raise
                time.sleep(2.5)

    def _submitted(self, submission_id: str) -> bool:
        try:
            return self.client.get_job_info(submission_id) is not None
        except RuntimeError:  # no such job, or the job agent is not up yet
            return False

    def status(self, job_id: str, run_id: str | None = None) -> TrainingJob | None:
        """The job's state; None for no training job of ours, or (with run_id) none of that run, told
        before any of the job's files is looked at."""
        try:
            info = self.client.get_job_info(job_id)
        except RuntimeError:  # unknown submission id
            return None
        metadata = info.metadata or {}
        model_uri = self._models.get(job_id) or metadata.get("model_uri", "")
        if not model_uri:
            return None  # not a training job of ours
        job_run = metadata.get("run_id") or self._run_of_uri(model_uri)
        if run_id is not None and job_run != run_id:
            return None
        _, progress_uri, cancel_uri = self._uris(job_id, model_uri)
        state = _JOB_STATES.get(str(info.status.value if hasattr(info.status, "value") else info.status), "FAILED")
        if state == "FAILED" and self.store.exists(cancel_uri):
            state = "CANCELLED"
        job = TrainingJob(job_id, model_uri, state=state, progress_uri=progress_uri, cancel_uri=cancel_uri)
        job.run_id = job_run
        started = self._read_progress(job, progress_uri)
        unplaced_uri = self.store.beside(model_uri, f".{job_id}.unplaced.json")
        if state in ("PENDING", "RUNNING") and not started and self._past_start_timeout(info):
            spec = self._spec(job_id, model_uri)
            self._stop_unplaced(job_id, unplaced_uri, spec.training if spec else TrainingConfig())
        if self.store.exists(unplaced_uri):
            job.state, job.error = "FAILED", self.store.read_json(unplaced_uri)["error"]
            return job
        if state == "SUCCEEDED":
            try:
                job.model_digest = self.store.read_json(commit_record_uri(self.store, job_id, model_uri))["digest"]
            except (OSError, ValueError, KeyError):
                job.state, job.error = "FAILED", "the job ended without recording the checkpoint it committed"
        if job.state == "CANCELLED":
            job.error = "cancelled by request"
        elif job.state == "FAILED" and not job.error:
            job.error = (info.message or "") + "\n" + self._log_tail(job_id)
        return job

    def _run_of_uri(self, uri: str) -> str:
        try:
            return self.store.run_of(self.store.resolve(uri))
        except ValueError:  # UriNotAllowed: not in the store (or, inside a request, not in its run)
            return ""

    def _read_progress(self, job: TrainingJob, progress_uri: str) -> bool:
        """Fills in the job's progress; False while its rank 0 has written none (no worker started)."""
        try:
            progress = self.store.read_json(progress_uri)
            job.step, job.total_steps = progress["step"], progress["total_steps"]
            job.losses, job.examples = progress["losses"], progress["examples"]
            job.real_token_share = progress.get("real_token_share", 0.0)
            job.resumed_from_step = progress.get("resumed_from_step", 0)
            return True
        except (OSError, ValueError, KeyError):
            # replaced atomically: a failed read only means no news yet, unless there never was any
            return self.store.exists(progress_uri)

    def _past_start_timeout(self, info) -> bool:
        submitted = (getattr(info, "start_time", None) or 0) / 1000  # Ray's job start, in ms
        return bool(submitted) and time.time() - submitted > self.start_timeout_s

    def _stop_unplaced(self, job_id: str, unplaced_uri: str, training: TrainingConfig) -> None:
        """A job whose workers never started holds a training slot and its driver forever: it is
        stopped, and why is recorded for every later status call."""
        import ray

        need = worker_needs(training.use_gpu, training.worker_resources)
        available = ray.available_resources() if ray.is_initialized() else {}
        free = f", and the cluster has {_amounts({n: available.get(n, 0) for n in need})} free now" if available else ""
        error = (
            f"no training worker started within {self.start_timeout_s:g} s (training.start_timeout_s): "
            f"{training.num_workers} workers need {_amounts(need)} each{free}; the job was stopped. Free room "
            "(fewer replicas, more nodes) or ask for fewer workers"
        )
        self.store.write_json(unplaced_uri, {"job_id": job_id, "error": error})
        try:
            self.client.stop_job(job_id)
        except RuntimeError:
            pass  # it ended meanwhile

    def _log_tail(self, job_id: str) -> str:
        try:
            return self.client.get_job_logs(job_id)[-2000:]
        except RuntimeError:
            return ""

    def cancel(self, job_id: str, run_id: str | None = None) -> TrainingJob | None:
        """Asks the run to stop at its next step (a file the workers look for), then stops the job."""
        job = self.status(job_id, run_id)
        if job and job.state in ("PENDING", "RUNNING"):
            self.store.write_bytes(job.cancel_uri, b"cancel\n")
            if job.step == 0:  # not training yet: no loop will see the file
                self.client.stop_job(job_id)
        return job


def commit_record_uri(store: RunStore, job_id: str, model_uri: str) -> str:
    """What a training job writes once it has committed its checkpoint: the checkpoint's digest."""
    return store.beside(model_uri, f".{job_id}.commit.json")
