"""Ray Train for real: a worker killed mid-run is restarted and resumes from its last checkpoint;
a cancelled run stops. Both on a local Ray cluster with one CPU worker."""

import os
import signal
import time
from dataclasses import replace

import pytest

from services.common.config import TrainingConfig
from services.common.formats import load_seed_tasks
from services.common.store import RunStore
from services.trainer.service import TrainerService

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from services.serving import wait_for_previous_cluster

    wait_for_previous_cluster()  # a killed cluster's agent may still hold its port
    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)  # the job API for training
    yield
    ray.shutdown()


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _progress(store: RunStore, job) -> dict:
    try:
        return store.read_json(job.progress_uri)
    except (OSError, ValueError):
        return {}


def test_killed_worker_resumes_from_checkpoint(local_ray, tmp_path, builtin_cache):
    from transformers import AutoModelForCausalLM

    store = RunStore(str(tmp_path))
    data = store.dataset_uri("kill", 1, "train")
    store.write_tasks(data, [replace(t, instances=t.instances[:1]) for t in load_seed_tasks()[:64]])
    service = TrainerService(store, builtin_cache_dir=builtin_cache)
    params = TrainingConfig(epochs=12, batch_size=4, max_seq_len=128, packing=False, checkpoint_every=5, max_failures=2)
    job = service.start("kill", 1, "builtin:tiny-llama", data, store.model_uri("kill", 1), params)
    # the controller picks reported checkpoints up asynchronously: let a few be reported first
    _wait(lambda: _progress(store, job).get("step", 0) >= 25, 240, "the first checkpoints")
    victim = _progress(store, job)["pid"]
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: service.status(job.job_id).state in ("SUCCEEDED", "FAILED"), 600, "the run to end")
    job = service.status(job.job_id)
    assert job.state == "SUCCEEDED", job.error
    assert job.resumed_from_step >= 5 and job.resumed_from_step % 5 == 0
    assert job.step == job.total_steps == 12 * 16
    assert _progress(store, job)["pid"] != victim
    model = AutoModelForCausalLM.from_pretrained(store.resolve(job.model_uri), use_safetensors=True)
    assert model.config.model_type == "llama"
    # a redeployed trainer replica (new service object, nothing in memory) attaches to the same job
    again = TrainerService(store, builtin_cache_dir=builtin_cache).start(
        "kill", 1, "builtin:tiny-llama", data, store.model_uri("kill", 1), params
    )
    assert (again.job_id, again.state) == (job.job_id, "SUCCEEDED")


def test_cancel_stops_a_run(local_ray, tmp_path, builtin_cache):
    store = RunStore(str(tmp_path))
    data = store.dataset_uri("cancel", 1, "train")
    store.write_tasks(data, load_seed_tasks()[:32])
    service = TrainerService(store, builtin_cache_dir=builtin_cache)
    job = service.start(
        "cancel",
        1,
        "builtin:tiny-llama",
        data,
        store.model_uri("cancel", 1),
        TrainingConfig(epochs=500, batch_size=4, max_seq_len=128, checkpoint_every=1000),
    )
    _wait(lambda: _progress(store, job).get("step", 0) >= 5, 240, "training to start")
    service.cancel(job.job_id)
    _wait(lambda: service.status(job.job_id).state in ("CANCELLED", "FAILED", "SUCCEEDED"), 300, "the cancel")
    job = service.status(job.job_id)
    assert job.state == "CANCELLED" and job.error == "cancelled by request"
    assert not store.exists(job.model_uri)  # nothing half-trained becomes visible


def test_a_store_given_as_a_uri_trains_end_to_end(local_ray, tmp_path, builtin_cache):
    """A store root given as a URI (fsspec's local:// here; s3:// or gs:// on a cluster) takes the
    store's remote path: the job reads its spec, reports progress and commits the checkpoint through
    the store, and Ray Train keeps its checkpoints there too."""
    store = RunStore(f"local://{tmp_path}/store")
    assert not store.is_local
    data = store.dataset_uri("uri", 1, "train")
    store.write_tasks(data, load_seed_tasks()[:16])
    service = TrainerService(store, builtin_cache_dir=builtin_cache)
    params = TrainingConfig(epochs=1, batch_size=4, max_seq_len=128, checkpoint_every=2)
    job = service.start("uri", 1, "builtin:tiny-llama", data, store.model_uri("uri", 1), params)
    _wait(lambda: service.status(job.job_id).state in ("SUCCEEDED", "FAILED"), 300, "the run to end")
    job = service.status(job.job_id)
    assert job.state == "SUCCEEDED", job.error
    progress = _progress(store, job)
    assert job.step == job.total_steps > 2 and progress["done"] is True
    # the worker ran with OpenMP's passive wait policy (training.omp_wait_policy) and response-only logits
    assert progress["omp_wait_policy"] == "PASSIVE" and progress["response_only_logits"] is True
    assert store.exists(job.model_uri + "/model.safetensors") and store.exists(job.model_uri + "/config.json")
    assert store.fs.glob(store.resolve(job.model_uri) + ".tmp-*") == []  # the staging directory was moved
    assert store.fs.glob(store.resolve(store.uri("uri", "ray_train")) + "/*")  # Ray Train's own checkpoints
    # the next round fine-tunes that checkpoint: the training workers fetch it from the store by URI
    again = service.start("uri", 2, job.model_uri, data, store.model_uri("uri", 2), params)
    _wait(lambda: service.status(again.job_id).state in ("SUCCEEDED", "FAILED"), 300, "the second run to end")
    assert service.status(again.job_id).state == "SUCCEEDED", service.status(again.job_id).error
    fetched = [p for p in os.listdir(os.path.join(builtin_cache, "remote")) if p.startswith("model-")]
    assert fetched and store.exists(store.model_uri("uri", 2) + "/model.safetensors")


def test_a_job_whose_workers_find_no_room_is_stopped_after_the_start_timeout(local_ray, tmp_path, builtin_cache):
    """Ray for real: every CPU of the cluster is held (an actor reserves them, as idle replicas do), so
    a job that fits the cluster's total is admitted and its worker waits; past training.start_timeout_s
    the trainer stops it, and every later status says why, with what is free."""
    import ray

    @ray.remote(num_cpus=4)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote(), timeout=60)
    try:
        store = RunStore(str(tmp_path))
        data = store.dataset_uri("full", 1, "train")
        store.write_tasks(data, load_seed_tasks()[:4])
        service = TrainerService(store, builtin_cache_dir=builtin_cache, start_timeout_s=20)
        job = service.start("full", 1, "builtin:tiny-llama", data, store.model_uri("full", 1), TrainingConfig())
        _wait(lambda: service.status(job.job_id).state == "FAILED", 240, "the unplaced job to be stopped")
        job = service.status(job.job_id)
        assert "no training worker started within 20 s" in job.error
        assert "1 workers need 1 CPU each, and the cluster has 0 CPU free now" in job.error, job.error
        assert not store.exists(store.model_uri("full", 1))
    finally:
        ray.kill(holder)


def test_the_drivers_training_section_reaches_the_worker_not_the_replicas(local_ray, tmp_path, builtin_cache):
    """A replica deployed with one recipe, a driver configured with another: the request carries the
    driver's section whole, and the Ray Train worker trains by it (the replica's merges nothing in)."""
    from services.api import trainer_pb2
    from services.common.config import parse_config
    from services.common.convert import uri_source
    from services.common.sections import to_message
    from services.trainer.deployment import TrainerDeployment
    from services.trainer.spec import TrainingJobSpec
    from tests.tiny import owned_context

    replica = TrainerDeployment.func_or_class(
        {
            "store": {"root": str(tmp_path)},
            "model": {"builtin_cache_dir": builtin_cache},
            "training": {"max_steps": 40, "batch_size": 2, "packing": True, "precision": "fp32"},
        }
    )
    driver = parse_config(
        {"training": {"max_steps": 3, "batch_size": 4, "max_seq_len": 128, "packing": False, "precision": "bf16"}}
    ).training
    store = RunStore(str(tmp_path))
    data = store.dataset_uri("drv", 1, "train")
    store.write_tasks(data, load_seed_tasks()[:16])
    started = replica.StartTraining(
        trainer_pb2.StartTrainingRequest(
            context=owned_context(str(tmp_path), "drv"),
            base_model_uri="builtin:tiny-llama",
            train_tasks=uri_source(data),
            output_model_uri=store.model_uri("drv", 1),
            training=to_message(driver),
            seed=3,
        )
    )
    service = replica.service
    _wait(lambda: service.status(started.job_id).state in ("SUCCEEDED", "FAILED"), 300, "the run to end")
    job = service.status(started.job_id)
    assert job.state == "SUCCEEDED", job.error
    assert job.step == job.total_steps == 3  # the driver's max_steps, not the replica's 40
    spec_uri = store.beside(job.model_uri, f".{job.job_id}.spec.json")
    spec = TrainingJobSpec.model_validate(store.read_json(spec_uri))
    assert spec.training == driver and spec.seed == 3
    assert _progress(store, job)["real_token_share"] < 1  # padded batches: the driver's packing (off)
