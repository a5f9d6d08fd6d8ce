"""The trainer's logic: one Ray Train TorchTrainer run per (run, round), tracked as a job.

A job id is derived from run, round and output URI, so a repeated StartTraining call (a client retry,
a resumed loop driver) attaches to the job already running or returns the finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import traceback
import uuid
from dataclasses import dataclass, field

from ..common.records import stable_id
from ..common.store import RunStore


@dataclass
class TrainingParams:
    epochs: int = 2
    max_steps: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_seq_len: int = 384
    num_workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    augmented_tag: str = ""
    packing: bool = True
    checkpoint_every: int = 50
    max_failures: int = 2
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    lora: dict = field(default_factory=lambda: {"enabled": False, "r": 8, "alpha": 16.0, "dropout": 0.05,
                                                "keep_adapter": False})
    fewshot_fraction: float = 0.0
    fewshot_k: int = 2


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
    progress_path: str = ""
    cancel_path: str = ""
    real_token_share: float = 0.0
    resumed_from_step: int = 0


class TrainerService:
    def __init__(self, store: RunStore, trust_remote_code: bool = False,
                 builtin_cache_dir: str = "~/.cache/reinstruct/builtin") -> None:
        self.store = store
        self.trust_remote_code = trust_remote_code
        self.builtin_cache_dir = builtin_cache_dir
        self._jobs: dict[str, TrainingJob] = {}
        self._lock = threading.Lock()

    def start(self, run_id: str, round_index: int, base_model: str, dataset_uri: str, model_uri: str,
              params: TrainingParams) -> TrainingJob:
        job_id = f"train-{stable_id(run_id, round_index, model_uri)}"
        with self._lock:
            job = self._jobs.get(job_id)
            if job and job.state in ("PENDING", "RUNNING", "SUCCEEDED"):
                return job  # a retry or a resumed driver attaches to the same job
            if self.store.exists(model_uri + "/config.json"):
                job = TrainingJob(job_id, model_uri, state="SUCCEEDED")  # committed by an earlier replica
                self._jobs[job_id] = job
                return job
            job = TrainingJob(job_id, model_uri)
            self._jobs[job_id] = job
        threading.Thread(target=self._run, args=(job, run_id, base_model, dataset_uri, params), daemon=True).start()
        return job

    def status(self, job_id: str) -> TrainingJob | None:
        job = self._jobs.get(job_id)
        if job and job.progress_path and os.path.exists(job.progress_path) and job.state == "RUNNING":
            try:
                with open(job.progress_path) as handle:
                    progress = json.load(handle)
                job.step, job.total_steps = progress["step"], progress["total_steps"]
                job.losses, job.examples = progress["losses"], progress["examples"]
                job.real_token_share = progress.get("real_token_share", 0.0)
                job.resumed_from_step = max(job.resumed_from_step, progress.get("resumed_from_step", 0))
            except (OSError, ValueError, KeyError):
                pass  # the file is replaced atomically; a failed read just means no news yet
        return job

    def _remove_stale_staging(self, model_uri: str) -> None:
        """A crash mid-training leaves '<model>.tmp-*'; it was never visible as a model, so drop it."""
        if not self.store.is_local:
            return
        path = self.store.resolve(model_uri)
        parent, name = os.path.split(path)
        for entry in os.listdir(parent) if os.path.isdir(parent) else []:
            if entry.startswith(f"{name}.tmp-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)

    def cancel(self, job_id: str) -> TrainingJob | None:
        """Asks a running job to stop at its next step (a file the workers look for)."""
        job = self._jobs.get(job_id)
        if job and job.state in ("PENDING", "RUNNING") and job.cancel_path:
            with open(job.cancel_path, "w") as handle:
                handle.write("cancel\n")
        return job

    def _run(self, job: TrainingJob, run_id: str, base_model: str, dataset_uri: str, params: TrainingParams) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from .train_loop import train_loop_per_worker

        self._remove_stale_staging(job.model_uri)
        staging = self.store.staging_dir(job.model_uri)
        job.progress_path = os.path.join(os.path.dirname(staging), f".{job.job_id}.progress.json")
        job.cancel_path = os.path.join(os.path.dirname(staging), f".{job.job_id}.cancel")
        for stale in (job.progress_path, job.cancel_path):
            if os.path.exists(stale):
                os.remove(stale)
        job.state = "RUNNING"
        try:
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={
                    "store_root": self.store.uri(), "dataset_uri": dataset_uri, "base_model": base_model,
                    "output_dir": staging, "progress_path": job.progress_path, "cancel_path": job.cancel_path,
                    "trust_remote_code": self.trust_remote_code, "builtin_cache_dir": self.builtin_cache_dir,
                    **params.__dict__,
                },
                scaling_config=ScalingConfig(num_workers=params.num_workers, use_gpu=params.use_gpu),
                run_config=RunConfig(name=f"{job.job_id}-{uuid.uuid4().hex[:6]}",
                                     storage_path=self.store.uri(run_id, "ray_train"),
                                     failure_config=FailureConfig(max_failures=params.max_failures)),
            )
            trainer.fit()
            self.status(job.job_id)
            job.step = job.total_steps or job.step
            self.store.commit_directory(staging, job.model_uri)
            job.state = "SUCCEEDED"
        except Exception as exc:  # reported to the client through GetTrainingStatus
            cancelled = os.path.exists(job.cancel_path)
            job.error = "cancelled by request" if cancelled else f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            job.state = "CANCELLED" if cancelled else "FAILED"
            shutil.rmtree(staging, ignore_errors=True)
