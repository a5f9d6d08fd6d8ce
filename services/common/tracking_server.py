"""Where MLflow is, as every process resolves it from the one config: the driver's tracker
(ray_jobs/tracking.py) and the trainer replica, which hands its own URI to its jobs' step loggers
(services/trainer/deployment.py, loss_log.py)."""

from __future__ import annotations

import os

from .config import ReinstructConfig


def tracking_uri(config: ReinstructConfig) -> str | None:
    """tracking.uri, or the embedded default: a SQLite store in a local run store's root."""
    if config.tracking.uri:
        return config.tracking.uri
    root = local_root(config.store.root)
    return f"sqlite:///{root}/mlflow.db" if root else None


def local_root(root: str) -> str | None:
    """The run store's root as a local path (None: an object store)."""
    if root.startswith("file://"):
        root = root[len("file://") :]
    elif "://" in root:
        return None
    return os.path.realpath(os.path.expanduser(root))


def quiet_http(timeout_s: int) -> None:
    """One bounded try per call: the callers retry with their own backoff (MLflow's retries hold a
    call for minutes)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
