"""The response-only loss equals the model's own loss and gradients, and falls back where it cannot."""

import pytest
import torch

from services.common.config import LoraConfig
from services.common.models import load_model
from services.common.rendering import Example, tokenize
from services.trainer.formatting import collate, collate_packed, pack
from services.trainer.loss import TrainingLoss, response_loss
from services.trainer.train_loop import _apply_lora

EXAMPLES = [
    Example("Task: Name a colour.\nAnswer:", " Blue", "a", "x"),
    Example("Write a poem about the sea please.\nOutput:", " Waves roll in and out of the bay", "b", "x"),
    Example("Say hi:", " hi", "c", "x"),
    Example("Translate to French: cat\nOutput:", " chat", "d", "x"),
]
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)


def _batches(tokenizer):
    features = [tokenize(e, tokenizer, 128, False) for e in EXAMPLES]
    return {
        "padded": collate(features, tokenizer.pad_token_id),
        "packed": collate_packed(pack(features, 64), tokenizer.pad_token_id),
    }


def _grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_response_only_loss_and_gradients_equal_the_models_own(builtin_cache, lora, layout):
    model, tokenizer = load_model("builtin:tiny-llama", cache_dir=builtin_cache)
    if lora:
        model = _apply_lora(model, LORA)
    model.train()
    batch = _batches(tokenizer)[layout]
    reference = model(**batch).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    fast = response_loss(model, batch)
    fast.backward()
    assert torch.allclose(fast, reference, rtol=1e-5, atol=1e-6)
    got = _grads(model)
    assert got.keys() == expected.keys() and expected  # the same parameters learn, LoRA's alone under LoRA
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name
    # the head is back in place: the model's own forward still gives logits over the vocabulary
    assert model(**batch).logits.shape[-1] == model.config.vocab_size


class _Wrapped(torch.nn.Module):
    """A causal LM whose forward does something to the logits after the head."""

    def __init__(self, inner, after_head):
        super().__init__()
        self.inner, self.after_head, self.config = inner, after_head, inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def set_output_embeddings(self, head):
        self.inner.set_output_embeddings(head)

    def forward(self, labels=None, **inputs):
        out = self.inner(**inputs)
        out.logits = self.after_head(self.inner, out.logits)
        if labels is not None:
            out.loss = self.inner.loss_function(out.logits, labels, self.inner.config.vocab_size)
        return out


def test_training_loss_checks_the_first_batch_and_falls_back_where_it_differs(builtin_cache):
    model, tokenizer = load_model("builtin:tiny-llama", cache_dir=builtin_cache)
    batch = _batches(tokenizer)["packed"]
    model.train()
    loss_of = TrainingLoss(model, encoder_decoder=False, sharded=False)
    assert loss_of.fast and not loss_of.checked
    assert torch.allclose(loss_of(batch), model(**batch).loss, rtol=1e-5)
    assert loss_of.fast and loss_of.mismatch is None and model.training  # the check left train mode on

    # logits soft-capped after the head (as Gemma 2's are; a cap near the logits' size): the loss differs
    capped = _Wrapped(model, lambda inner, logits: torch.tanh(logits))
    loss_of = TrainingLoss(capped, encoder_decoder=False, sharded=False)
    assert torch.allclose(loss_of(batch), capped(**batch).loss)
    assert not loss_of.fast and "using the model's" in loss_of.mismatch

    # a forward that reads its head's weight (as Mamba's does) fails with the head set aside
    reads_head = _Wrapped(model, lambda inner, logits: logits.to(inner.lm_head.weight.dtype))
    loss_of = TrainingLoss(reads_head, encoder_decoder=False, sharded=False)
    assert torch.allclose(loss_of(batch), reads_head(**batch).loss)
    assert not loss_of.fast and "failed (AttributeError" in loss_of.mismatch
    assert model.get_output_embeddings() is model.lm_head and model.lm_head.weight is model.model.embed_tokens.weight


def test_models_whose_loss_is_more_than_the_heads_keep_their_own(builtin_cache):
    model, _ = load_model("builtin:tiny-llama", cache_dir=builtin_cache)
    model.config.output_router_logits = True  # a mixture of experts adds its router loss
    assert not TrainingLoss(model, encoder_decoder=False, sharded=False).fast


def test_encoder_decoder_and_sharded_models_keep_their_own_loss(builtin_cache):
    model, _ = load_model("builtin:tiny-t5", cache_dir=builtin_cache)
    assert not TrainingLoss(model, encoder_decoder=True, sharded=False).fast
    llama, _ = load_model("builtin:tiny-llama", cache_dir=builtin_cache)
    assert not TrainingLoss(llama, encoder_decoder=False, sharded=True).fast
