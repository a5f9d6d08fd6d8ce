"""One training run as a Ray job (submitted by the trainer service, one per run and round):

    python -m services.trainer.job --store-root <root> --spec <root>/<run>/round-<k>/.train-<id>.spec.json

A job outlives the Serve replica that submitted it, so a redeployed trainer attaches to it again by
its submission id. The spec names the dataset, the base model, where the checkpoint goes, and every
training parameter; the job commits the checkpoint atomically when fit() succeeds, then records its
digest (the trainer adopts no checkpoint without it). Every file goes through the run store (a local
root or an object-store URI alike)."""

from __future__ import annotations

import argparse
import sys
import uuid

from ..common.config import TrainingConfig
from ..common.store import RunStore
from .spec import TrainingJobSpec, WorkerConfig

EXIT_CANCELLED = 3


def run(store_root: str, spec: TrainingJobSpec) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_loop import train_loop_per_worker

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    store = RunStore(store_root)
    training = spec.training
    staging = store.staging_uri(spec.model_uri)
    worker = WorkerConfig(spec=spec, store_root=store_root, staging_uri=staging)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=worker.model_dump(mode="json"),
            scaling_config=ScalingConfig(
                num_workers=training.num_workers,
                use_gpu=training.use_gpu,
                resources_per_worker=_worker_resources(training),
            ),
            run_config=RunConfig(
                name=f"{spec.job_id}-{uuid.uuid4().hex[:6]}",
                storage_path=store.uri(spec.run_id, "ray_train"),
                failure_config=FailureConfig(max_failures=training.max_failures),
            ),
        )
        trainer.fit()
        store.commit_directory(staging, spec.model_uri)
        # the checkpoint's digest, for whoever adopts it later (service.py: never without)
        store.write_json(
            spec.commit_uri,
            {"job_id": spec.job_id, "model_uri": spec.model_uri, "digest": store.tree_digest(spec.model_uri)},
        )
        return 0
    except Exception:
        store.remove_staging(spec.model_uri)
        if store.exists(spec.cancel_uri):
            print("training cancelled by request", file=sys.stderr)
            return EXIT_CANCELLED  # the service reads the cancel file and reports CANCELLED
        raise


def _worker_resources(training: TrainingConfig) -> dict | None:
    """A worker's CPU (or GPU), plus the custom resources that place it (training.worker_resources);
    None leaves Ray Train's own default, the same CPU or GPU."""
    from .placement import worker_needs

    custom = training.worker_resources
    return worker_needs(training.use_gpu, custom) if custom else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-root", required=True, help="the run store's root (a path or a URI)")
    parser.add_argument("--spec", required=True, help="the spec's URI in that store")
    args = parser.parse_args(argv)
    store = RunStore(args.store_root)
    return run(store.uri(), TrainingJobSpec.model_validate(store.read_json(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
