"""Placement settings reach Ray: custom resources per Serve app into the replicas' actor options,
training.worker_resources into Ray Train's resources per worker (beside the CPU or GPU it takes)."""

import pytest

from services.common.config import ConfigError, TrainingConfig, parse_config, replica_options
from services.trainer.job import _worker_resources


def test_app_resources_reach_the_replicas_actor_options():
    config = parse_config({"serve": {"generator": {"resources": {"serving": 1}}}})
    assert replica_options(config, "generator")["ray_actor_options"]["resources"] == {"serving": 1.0}
    assert "resources" not in replica_options(config, "evaluator")["ray_actor_options"]
    # the trainer's replica takes no CPU, but a resource named for it still places it
    config = parse_config({"serve": {"trainer": {"resources": {"control": 0.1}}}})
    options = replica_options(config, "trainer", num_cpus=0)["ray_actor_options"]
    assert options["resources"] == {"control": 0.1} and options["num_cpus"] == 0


def test_worker_resources_add_to_the_workers_cpu_or_gpu():
    assert _worker_resources(TrainingConfig()) is None  # Ray Train's default
    assert _worker_resources(TrainingConfig(worker_resources={"training": 1})) == {"CPU": 1, "training": 1}
    assert _worker_resources(TrainingConfig(use_gpu=True, worker_resources={"training": 1})) == {
        "GPU": 1,
        "training": 1,
    }


def test_strategy_is_ddp_or_fsdp():
    assert parse_config({}).training.strategy == "ddp"
    assert parse_config({"training": {"strategy": "fsdp"}}).training.strategy == "fsdp"
    with pytest.raises(ConfigError, match="training.strategy"):
        parse_config({"training": {"strategy": "zero3"}})
