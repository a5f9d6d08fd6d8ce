"""One training run as a Ray job (submitted by the trainer service, one per run and round):

    python -m ray_jobs.train --store-root <root> --spec <root>/<run>/round-<k>/.train-<id>.spec.json

A job outlives the Serve replica that submitted it, so a redeployed trainer attaches to it again by
its submission id. The spec names the dataset, the base model, where the checkpoint goes, and every
training parameter; the job commits the checkpoint atomically when fit() succeeds, then records its
digest (the trainer adopts no checkpoint without it). Every file goes through the run store (a local
root or an object-store URI alike)."""

from __future__ import annotations

import argparse
import sys
import uuid

from services.common.store import RunStore

EXIT_CANCELLED = 3


def run(store_root: str, spec: dict) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.trainer.service import commit_record_uri
    from services.trainer.train_loop import train_loop_per_worker

    from .tracking import training_target

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    store = RunStore(store_root)
    params = spec["params"]
    staging = store.staging_uri(spec["model_uri"])
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "store_root": store_root,
                "dataset_uri": spec["dataset_uri"],
                "base_model": spec["base_model"],
                "staging_uri": staging,
                "progress_uri": spec["progress_uri"],
                "cancel_uri": spec["cancel_uri"],
                "trust_remote_code": spec["trust_remote_code"],
                "builtin_cache_dir": spec["builtin_cache_dir"],
                "prompt_format": spec["prompt_format"],
                "seed_tag": spec.get("seed_tag", ""),
                "tracking": training_target(store, spec),  # None: rank 0 logs no loss to MLflow
                **params,
            },
            scaling_config=ScalingConfig(
                num_workers=params["num_workers"],
                use_gpu=params["use_gpu"],
                resources_per_worker=_worker_resources(params),
            ),
            run_config=RunConfig(
                name=f"{spec['job_id']}-{uuid.uuid4().hex[:6]}",
                storage_path=store.uri(spec["run_id"], "ray_train"),
                failure_config=FailureConfig(max_failures=params["max_failures"]),
            ),
        )
        trainer.fit()
        store.commit_directory(staging, spec["model_uri"])
        # the checkpoint's digest, for whoever adopts it later (services.trainer.service: never without)
        store.write_json(
            spec.get("commit_uri") or commit_record_uri(store, spec["job_id"], spec["model_uri"]),
            {"job_id": spec["job_id"], "model_uri": spec["model_uri"], "digest": store.tree_digest(spec["model_uri"])},
        )
        return 0
    except Exception:
        store.remove_staging(spec["model_uri"])
        if store.exists(spec["cancel_uri"]):
            print("training cancelled by request", file=sys.stderr)
            return EXIT_CANCELLED  # the service reads the cancel file and reports CANCELLED
        raise


def _worker_resources(params: dict) -> dict | None:
    """A worker's CPU (or GPU), plus the custom resources that place it (training.worker_resources);
    None leaves Ray Train's own default, the same CPU or GPU."""
    from services.trainer.placement import worker_needs

    custom = params.get("worker_resources") or {}
    return worker_needs(params["use_gpu"], custom) if custom else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-root", required=True, help="the run store's root (a path or a URI)")
    parser.add_argument("--spec", required=True, help="the spec's URI in that store")
    args = parser.parse_args(argv)
    store = RunStore(args.store_root)
    return run(store.uri(), store.read_json(args.spec))


if __name__ == "__main__":
    sys.exit(main())
