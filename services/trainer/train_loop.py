"""The per-worker training loop: plain PyTorch with Ray Train's prepare_* and report.

Checkpoints (weights, optimizer, scheduler, step) are reported to Ray Train every checkpoint_every
steps; when a worker dies, Ray Train (FailureConfig) restarts the group and the loop resumes from the
last one. Progress goes to a small JSON file beside the checkpoint (written atomically, through the run store)
so the trainer service can answer status calls while fit() runs; a 'cancel' file beside it stops the
run. Rank 0 saves the final checkpoint into the store's staging URI; the job commits it.

training.strategy picks how the workers hold the model: ddp (Ray Train's prepare_model: a full copy
each) or fsdp (FSDP2's fully_shard: one shard each, every transformer block its own group, gathered
only for its forward and backward). Under fsdp every checkpoint is the full state dict gathered onto
rank 0, so Ray Train's checkpoints resume any worker count and the final one is an ordinary HF
checkpoint; LoRA is merged after the gather, on an unsharded copy (peft cannot merge a sharded model).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time

import torch

from ..common.config import LoraConfig, TrainingConfig
from ..common.models import load_model
from ..common.rendering import Renderer, tokenize
from ..common.store import RunStore
from .formatting import collate, collate_packed, pack
from .loss import TrainingLoss
from .spec import TrainingJobSpec, WorkerConfig

PROGRESS_EVERY = 5


class Cancelled(RuntimeError):
    pass


def _batches(features: list[dict], training: TrainingConfig, encoder_decoder: bool, pad_id: int):
    """(dataset, collate_fn, batch size, real-token share)."""
    max_len = training.max_seq_len
    if training.packing and not encoder_decoder:
        packs = pack(features, max_len)
        mean_len = sum(len(f["input_ids"]) for f in features) / max(len(features), 1)
        batch_size = max(1, round(training.batch_size * mean_len / max_len))
        width = max((len(p["input_ids"]) for p in packs), default=1)
        share = sum(len(p["input_ids"]) for p in packs) / max(len(packs) * width, 1)
        return packs, (lambda b: collate_packed(b, pad_id)), batch_size, share
    longest = max((len(f["input_ids"]) for f in features), default=1)
    share = sum(len(f["input_ids"]) for f in features) / max(len(features) * longest, 1)
    return features, (lambda b: collate(b, pad_id)), training.batch_size, share


def _apply_lora(model, lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = "all-linear"
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def _shard(model, device: torch.device):
    """FSDP2 over every worker: each transformer block (the model's _no_split_modules, which is also
    what peft's and accelerate's FSDP wrap policy wraps) is sharded as one group, the rest in the root.
    Parameters become DTensors; frozen base weights and trainable LoRA weights may share a group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh's device is the current one
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    # no model.to(device): fully_shard moves each group as it shards it, so no device holds it all
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _held_share(model) -> float:
    """The share of the model's parameters this worker holds: 1 under ddp, about 1/n under fsdp."""
    params = list(model.parameters())
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
    return held / max(sum(p.numel() for p in params), 1)


def _gathered(model, optimizer=None) -> tuple[dict, dict]:
    """fsdp: the full model (and optimizer) state dicts, on rank 0's CPU. A collective: every rank
    calls it; the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return weights, (get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else {})


def _restore_sharded(model, optimizer, directory: str) -> None:
    """fsdp: every rank loads the full state dicts of a checkpoint and keeps its own shard of them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    weights = torch.load(os.path.join(directory, "weights.pt"), weights_only=True)
    set_model_state_dict(model, weights, options=options)
    state = torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def _unsharded(weights: dict, spec: TrainingJobSpec):
    """rank 0, fsdp: the trained weights in an ordinary module (base model, plus LoRA when on), which
    save_pretrained and merge_and_unload take as they are. It holds a second copy of the model in
    CPU memory while the checkpoint is written; the accelerators never hold a full one."""
    model, _ = load_model(spec.base_model, trust_remote_code=spec.trust_remote_code, cache_dir=spec.builtin_cache_dir)
    if spec.training.lora.enabled:
        model = _apply_lora(model, spec.training.lora)
    model.load_state_dict(weights)
    return model


def _save_final(model, tokenizer, lora: LoraConfig, staging_uri: str, store: RunStore) -> None:
    """Saves into the staging URI: directly on a local (or shared) store, else into a local temporary
    that is then uploaded, so rank 0 may run on any node."""
    if store.is_local:
        output_dir = store.resolve(staging_uri)
        os.makedirs(output_dir, exist_ok=True)
        _save_pretrained(model, tokenizer, lora, output_dir)
        return
    with tempfile.TemporaryDirectory() as output_dir:
        _save_pretrained(model, tokenizer, lora, output_dir)
        store.put_directory(output_dir, staging_uri)


def _save_pretrained(model, tokenizer, lora: LoraConfig, output_dir: str) -> None:
    if lora.enabled:
        if lora.keep_adapter:
            model.save_pretrained(output_dir)  # adapter_config.json + adapter weights; base named inside
        else:
            model.merge_and_unload().save_pretrained(output_dir, safe_serialization=True)
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_model as load_weights
    from safetensors.torch import save_model as save_weights

    worker = WorkerConfig.model_validate(config)
    spec, training = worker.spec, worker.spec.training
    if training.torch_threads:  # else Ray's OMP_NUM_THREADS: the CPUs the worker reserved
        torch.set_num_threads(training.torch_threads)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    store = RunStore(worker.store_root)
    tasks = store.read_tasks(spec.dataset_uri)
    model, tokenizer = load_model(
        spec.base_model, trust_remote_code=spec.trust_remote_code, cache_dir=spec.builtin_cache_dir
    )
    encoder_decoder = bool(model.config.is_encoder_decoder)
    renderer = Renderer.for_tokenizer(tokenizer, spec.prompt_format, spec.augmented_tag, spec.seed_tag)
    examples = renderer.render_all(tasks, spec.seed, training.fewshot_fraction, training.fewshot_k)
    features = [tokenize(e, tokenizer, training.max_seq_len, encoder_decoder) for e in examples]
    dataset, collate_fn, batch_size, share = _batches(features, training, encoder_decoder, tokenizer.pad_token_id)
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if training.lora.enabled:
        model = _apply_lora(model, training.lora)
    model.train()
    device = ray.train.torch.get_device()
    sharded = training.strategy == "fsdp"
    model = _shard(model, device) if sharded else ray.train.torch.prepare_model(model)
    held_share = _held_share(model)
    loss_of = TrainingLoss(model, encoder_decoder=encoder_decoder, sharded=sharded)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=training.learning_rate, weight_decay=0.0
    )
    steps_per_epoch = max(math.ceil(len(dataset) / batch_size / context.get_world_size()), 1)
    total = steps_per_epoch * training.epochs
    if training.max_steps:
        total = min(total, training.max_steps)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / total)))
    )
    step, losses, resumed_from = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group: go on where the last checkpoint left off
        with checkpoint.as_directory() as directory:
            if sharded:
                _restore_sharded(model, optimizer, directory)
            else:
                unwrapped = model.module if hasattr(model, "module") else model
                load_weights(unwrapped, os.path.join(directory, "weights.safetensors"), strict=False)
                optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True))
            schedule.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt"), weights_only=True))
            with open(os.path.join(directory, "state.json")) as handle:
                state = json.load(handle)
            step, losses, resumed_from = state["step"], state["losses"], state["step"]
    precision = training.precision
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and device.type == "cuda" else None
    progress_uri, cancel_uri = spec.progress_uri, spec.cancel_uri
    started = time.time()
    step_log = None
    if rank == 0 and spec.loss_log is not None:
        from .loss_log import StepLogger

        step_log = StepLogger(spec.loss_log)

    def progress(done: bool = False) -> None:
        if rank == 0:
            store.write_json(
                progress_uri,
                {
                    "step": step,
                    "total_steps": total,
                    "losses": losses,
                    "examples": len(features),
                    "real_token_share": share,
                    "held_parameter_share": held_share,
                    "response_only_logits": loss_of.fast if loss_of.checked else None,
                    "loss_note": loss_of.mismatch,
                    "resumed_from_step": resumed_from,
                    "pid": os.getpid(),
                    "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                    "elapsed_s": time.time() - started,
                    "done": done,
                },
            )

    progress()
    generator = torch.Generator()
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        generator.manual_seed(spec.seed * 1000 + epoch)  # the same order on a resume
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, generator=generator
        )
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=True)
        for index, batch in enumerate(loader):
            if index < skip:
                continue
            if store.exists(cancel_uri):
                raise Cancelled("training cancelled by request")
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_of(batch)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            if step_log is not None:
                step_log.add(step, losses[-1])
            if step % PROGRESS_EVERY == 0:
                progress()
                if step_log is not None:
                    step_log.flush()
            if step % training.checkpoint_every == 0 and step < total:
                metrics = {"loss": losses[-1], "step": step}
                weights, optimizer_state = _gathered(model, optimizer) if sharded else ({}, {})
                if rank == 0:
                    with tempfile.TemporaryDirectory() as directory:
                        if sharded:
                            torch.save(weights, os.path.join(directory, "weights.pt"))
                            torch.save(optimizer_state, os.path.join(directory, "optimizer.pt"))
                        else:
                            unwrapped = model.module if hasattr(model, "module") else model
                            save_weights(unwrapped, os.path.join(directory, "weights.safetensors"))  # tied ok
                            torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
                        torch.save(schedule.state_dict(), os.path.join(directory, "scheduler.pt"))
                        with open(os.path.join(directory, "state.json"), "w") as handle:
                            json.dump({"step": step, "losses": losses}, handle)
                        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
                else:
                    ray.train.report(metrics)
            if step >= total:
                break
    weights = _gathered(model)[0] if sharded else {}
    if rank == 0:
        if sharded:
            unwrapped = _unsharded(weights, spec)
        else:
            unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.eval()
        _save_final(unwrapped, tokenizer, training.lora, worker.staging_uri, store)
        progress(done=True)
        if step_log is not None:
            step_log.flush(force=True)
    ray.train.report({"loss": losses[-1] if losses else float("nan"), "step": step})
