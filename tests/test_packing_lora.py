"""Packing without leakage, the prompt mask inside every packed example, LoRA save/merge/reload."""

import pytest
import torch

from services.common.config import LoraConfig
from services.common.models import load_model
from services.common.rendering import IGNORE_INDEX, Example, tokenize
from services.common.store import RunStore
from services.trainer.formatting import collate, collate_packed, pack
from services.trainer.train_loop import _apply_lora, _save_final


@pytest.fixture(scope="module")
def llama(builtin_cache):
    return load_model("builtin:tiny-llama", cache_dir=builtin_cache)


EXAMPLES = [
    Example("Task: Name a colour.\nAnswer:", " Blue", "a", "x"),
    Example("Write a poem about the sea please.\nOutput:", " Waves roll in and out", "b", "x"),
    Example("Say hi:", " hi", "c", "x"),
    Example("Translate to French: cat\nOutput:", " chat", "d", "x"),
]


def _per_token_losses(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return losses, shift_labels != IGNORE_INDEX


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_example_loss(llama, attention):
    model, tok = llama
    model.set_attn_implementation(attention)  # the 4-D mask must hold under both
    features = [tokenize(e, tok, 128, False) for e in EXAMPLES]
    one_by_one = []
    with torch.no_grad():
        for f in features:
            losses, mask = _per_token_losses(model, collate([f], tok.pad_token_id))
            one_by_one.append(losses[mask].sum().item())
        packs = pack(features, 64)
        assert len(packs) < len(features)  # several examples share a sequence
        losses, mask = _per_token_losses(model, collate_packed(packs, tok.pad_token_id))
    # regroup the packed token losses by example: each example's tokens are contiguous in its pack
    packed_totals = []
    for row, p in enumerate(packs):
        segments = torch.tensor(p["segment_ids"])[1:]  # aligned with the shifted labels
        for segment in range(p["examples"]):
            select = (segments == segment) & mask[row, : len(segments)]
            packed_totals.append(losses[row, : len(segments)][select].sum().item())
    assert sorted(packed_totals) == pytest.approx(sorted(one_by_one), rel=1e-4, abs=1e-4)


def test_prompt_mask_holds_inside_every_packed_example(llama):
    _, tok = llama
    features = [tokenize(e, tok, 128, False) for e in EXAMPLES]
    for p in pack(features, 64):
        for segment in range(p["examples"]):
            positions = [i for i, s in enumerate(p["segment_ids"]) if s == segment]
            ids = [p["input_ids"][i] for i in positions]
            labels = [p["labels"][i] for i in positions]
            learned = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
            text = tok.decode(ids[:-1])
            example = next(e for e in EXAMPLES if e.prompt + e.response == text)
            assert tok.decode(learned[:-1]) == example.response  # only this example's response (+ EOS)
            assert [p["position_ids"][i] for i in positions] == list(range(len(positions)))


def test_packing_fills_sequences():
    features = [{"input_ids": [1] * n, "labels": [1] * n} for n in (60, 50, 40, 30, 20, 10, 64, 5)]
    packs = pack(features, 64)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(f["input_ids"]) for f in features)
    assert all(len(p["input_ids"]) <= 64 for p in packs)
    assert len(packs) == 5  # 279 tokens need at least 5 sequences of 64


@pytest.mark.parametrize("keep_adapter", [False, True])
def test_lora_trains_saves_and_reloads(builtin_cache, tmp_path, keep_adapter):
    model, tok = load_model("builtin:tiny-llama", cache_dir=builtin_cache)
    store = RunStore(str(tmp_path))
    lora = LoraConfig(enabled=True, r=4, alpha=8.0, dropout=0.0, keep_adapter=keep_adapter)
    model = _apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) / 10
    batch = collate([tokenize(EXAMPLES[0], tok, 64, False)], tok.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    _save_final(model, tok, lora, store.uri("out"), store)  # rank 0 saves there; the job commits it
    reloaded, reloaded_tok = load_model(str(tmp_path / "out"), cache_dir=builtin_cache)
    ids = reloaded_tok("Say hi:", return_tensors="pt", add_special_tokens=False).input_ids
    out = reloaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=reloaded_tok.pad_token_id)
    assert out.shape[1] <= ids.shape[1] + 3
    assert (tmp_path / "out" / ("adapter_config.json" if keep_adapter else "model.safetensors")).exists()


def test_bf16_autocast_and_gradient_checkpointing_on_cpu(builtin_cache):
    model, tok = load_model("builtin:tiny-llama", cache_dir=builtin_cache)
    model.train()
    model.gradient_checkpointing_enable()
    batch = collate([tokenize(e, tok, 64, False) for e in EXAMPLES], tok.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad is not None
