"""The per-worker training loop: plain PyTorch with Ray Train's prepare_* and report.

Progress goes to a small JSON file beside the staging checkpoint (written atomically) so the trainer
service can answer status calls while fit() runs.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import torch

from ..common.models import load_model
from ..common.store import RunStore
from .formatting import collate, render_all, tokenize


def _write_progress(path: str, progress: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(progress, handle)
    os.replace(tmp, path)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    store = RunStore(config["store_root"])
    tasks = store.read_tasks(config["dataset_uri"])
    model, tokenizer = load_model(config["base_model"], trust_remote_code=config["trust_remote_code"],
                                  cache_dir=config["builtin_cache_dir"])
    encoder_decoder = bool(model.config.is_encoder_decoder)
    features = [tokenize(e, tokenizer, config["max_seq_len"], encoder_decoder)
                for e in render_all(tasks, config["seed"], config.get("augmented_tag", ""))]
    # Sort into length buckets, then shuffle the buckets: little padding, still random order.
    loader = torch.utils.data.DataLoader(
        features, batch_size=config["batch_size"], shuffle=True,
        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(config["seed"]),
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    model.train()
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=0.0)
    steps_per_epoch = max(len(loader), 1)
    total = steps_per_epoch * config["epochs"]
    if config["max_steps"]:
        total = min(total, config["max_steps"])
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / total)))
    )
    progress_path = config["progress_path"]
    losses: list[float] = []
    step = 0
    started = time.time()
    while step < total:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            if rank == 0 and (step % 5 == 0 or step == total):
                _write_progress(progress_path, {"step": step, "total_steps": total, "losses": losses,
                                                "examples": len(features), "elapsed_s": time.time() - started})
            if step >= total:
                break
    metrics = {"loss": losses[-1] if losses else float("nan"), "step": step, "total_steps": total}
    if rank == 0:
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.eval()
        unwrapped.save_pretrained(config["output_dir"], safe_serialization=True)
        tokenizer.save_pretrained(config["output_dir"])
        _write_progress(progress_path, {"step": step, "total_steps": total, "losses": losses,
                                        "examples": len(features), "elapsed_s": time.time() - started, "done": True})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(config["output_dir"]))
    else:
        ray.train.report(metrics)
