"""One training run as a Ray job (submitted by the trainer service, one per run and round):

    python -m ray_jobs.train --spec <run store>/<run>/round-<k>/.train-<id>.spec.json

A job outlives the Serve replica that submitted it, so a redeployed trainer attaches to it again by
its submission id. The spec names the dataset, the base model, where the checkpoint goes, and every
training parameter; the job commits the checkpoint atomically when fit() succeeds."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid

EXIT_CANCELLED = 3


def run(spec: dict) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.common.store import RunStore
    from services.trainer.train_loop import train_loop_per_worker

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    store = RunStore(spec["store_root"])
    params = spec["params"]
    staging = store.staging_dir(spec["model_uri"])
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "store_root": spec["store_root"],
                "dataset_uri": spec["dataset_uri"],
                "base_model": spec["base_model"],
                "output_dir": staging,
                "progress_path": spec["progress_path"],
                "cancel_path": spec["cancel_path"],
                "trust_remote_code": spec["trust_remote_code"],
                "builtin_cache_dir": spec["builtin_cache_dir"],
                "prompt_format": spec["prompt_format"],
                "seed_tag": spec.get("seed_tag", ""),
                **params,
            },
            scaling_config=ScalingConfig(num_workers=params["num_workers"], use_gpu=params["use_gpu"]),
            run_config=RunConfig(
                name=f"{spec['job_id']}-{uuid.uuid4().hex[:6]}",
                storage_path=store.uri(spec["run_id"], "ray_train"),
                failure_config=FailureConfig(max_failures=params["max_failures"]),
            ),
        )
        trainer.fit()
        store.commit_directory(staging, spec["model_uri"])
        return 0
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.exists(spec["cancel_path"]):
            print("training cancelled by request", file=sys.stderr)
            return EXIT_CANCELLED  # the service reads the cancel file and reports CANCELLED
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    with open(args.spec) as handle:
        return run(json.load(handle))


if __name__ == "__main__":
    sys.exit(main())
