"""training.strategy: fsdp for real, on 2 CPU workers over gloo: FSDP2 trains the model DDP trains,
resumes from its gathered checkpoints after a worker is killed, and saves ordinary HF checkpoints
(LoRA merged after the gather)."""

import os
import signal
import time

import pytest
import torch

from services.common.config import LoraConfig, TrainingConfig
from services.common.formats import load_seed_tasks
from services.common.models import resolve_model
from services.common.store import RunStore
from services.trainer.service import TrainerService
from tests.ray_cluster import local_cluster

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray(builtin_cache):
    # built here once: two workers building the preset at once into an empty cache have left it
    # half-written (services.common.models._commit_checkpoint: ENOTEMPTY, then no model.safetensors)
    resolve_model("builtin:tiny-llama", builtin_cache)
    with local_cluster(4):  # one node; its own ports (the job API's agent too)
        yield


def _progress(store: RunStore, job) -> dict:
    try:
        return store.read_json(job.progress_uri)
    except (OSError, ValueError):
        return {}


def _train(service: TrainerService, store: RunStore, name: str, params: TrainingConfig, kill_after: int = 0):
    """Trains on 24 seed tasks into <name>'s round-1 model; kill_after: SIGKILL rank 0 once past that step."""
    data = store.dataset_uri(name, 1, "train")
    store.write_tasks(data, load_seed_tasks()[:24])
    job = service.start(name, 1, "builtin:tiny-llama", data, store.model_uri(name, 1), params)
    deadline, victim = time.time() + 600, None
    while service.status(job.job_id).state not in ("SUCCEEDED", "FAILED"):
        assert time.time() < deadline, f"{name}: training never ended"
        if kill_after and victim is None and _progress(store, job).get("step", 0) > kill_after:
            victim = _progress(store, job)["pid"]
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
    job = service.status(job.job_id)
    assert job.state == "SUCCEEDED", job.error
    return job, victim


def _weights(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True)
    assert model.config.architectures == ["LlamaForCausalLM"]  # no FSDP or peft class leaked into it
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.state_dict()


def test_fsdp_trains_what_ddp_trains_and_resumes_after_a_killed_worker(local_ray, tmp_path, builtin_cache):
    store = RunStore(str(tmp_path))
    service = TrainerService(store, builtin_cache_dir=builtin_cache)
    common = dict(epochs=2, batch_size=4, max_seq_len=128, packing=False, checkpoint_every=4, num_workers=2)
    ddp, _ = _train(service, store, "ddp", TrainingConfig(strategy="ddp", **common))
    fsdp, victim = _train(service, store, "fsdp", TrainingConfig(strategy="fsdp", **common), kill_after=9)

    assert _progress(store, ddp)["held_parameter_share"] == 1.0
    assert 0.45 < _progress(store, fsdp)["held_parameter_share"] < 0.55  # each worker holds half the weights
    assert victim is not None and _progress(store, fsdp)["pid"] != victim
    assert fsdp.resumed_from_step in (4, 8), fsdp.resumed_from_step  # from a gathered (full) checkpoint
    assert fsdp.step == fsdp.total_steps == ddp.total_steps >= 12
    # The same data, the same averaged gradients: sharding changes the arithmetic's order only.
    assert fsdp.losses == pytest.approx(ddp.losses, rel=1e-4)
    assert ddp.losses[-1] < ddp.losses[0]
    trained, reference = _weights(store.resolve(fsdp.model_uri)), _weights(store.resolve(ddp.model_uri))
    base = _weights(resolve_model("builtin:tiny-llama", builtin_cache))
    for name, tensor in reference.items():
        assert torch.allclose(trained[name], tensor, atol=1e-4), name
    assert any(not torch.equal(base[name], tensor) for name, tensor in trained.items())


def test_lora_under_fsdp_is_merged_after_the_gather(local_ray, tmp_path, builtin_cache):
    """peft cannot merge a sharded model: rank 0 merges the gathered weights on an unsharded copy."""
    store = RunStore(str(tmp_path))
    service = TrainerService(store, builtin_cache_dir=builtin_cache)
    lora = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0, keep_adapter=False)
    params = TrainingConfig(
        strategy="fsdp", num_workers=2, max_steps=6, batch_size=4, max_seq_len=128, learning_rate=1e-2, lora=lora
    )
    job, _ = _train(service, store, "lora", params)
    path = store.resolve(job.model_uri)
    assert not os.path.exists(os.path.join(path, "adapter_config.json"))  # merged, not an adapter
    merged, base = _weights(path), _weights(resolve_model("builtin:tiny-llama", builtin_cache))
    assert set(merged) == set(base)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    # LoRA on every linear layer moved those weights; the embeddings and norms stayed frozen
    assert any(name.endswith("q_proj.weight") for name in changed)
    assert not any("norm" in name or "embed_tokens" in name for name in changed), changed
