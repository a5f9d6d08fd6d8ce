"""What one training worker asks Ray for: a CPU, or a GPU with training.use_gpu, plus the custom
resources that place it (training.worker_resources). The job's scaling config, the deployment's
check before a job starts and the message for a job whose workers never started all read it here."""

from __future__ import annotations


def worker_needs(use_gpu: bool, worker_resources: dict | None) -> dict[str, float]:
    return {("GPU" if use_gpu else "CPU"): 1, **(worker_resources or {})}
