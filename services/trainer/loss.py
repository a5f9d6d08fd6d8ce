"""The training loss with logits only where they are scored.

A causal LM's head maps every position to the whole vocabulary (49k for SmolLM2: about a fifth of a
step's FLOPs and most of its memory traffic), and the loss then ignores every position outside the
responses. Here the model runs with its head set aside, the head runs on the response positions
alone, and the loss is the same token-mean cross-entropy transformers computes.

The model's own forward may do more after its head (Gemma 2's soft-capping, Granite's scaling), so
the first batch checks the fast loss against `model(**batch).loss`; a model where they differ, an
encoder-decoder or an FSDP-sharded one (its root parameters are gathered only inside the root's
forward) keeps the model's own loss.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..common.rendering import IGNORE_INDEX

AGREEMENT = 1e-2  # relative: bf16 autocast rounds the two paths' matmuls differently


def _causal_lm(model):
    """The transformers module under DDP's and peft's wrappers (peft injects LoRA in place)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


@contextmanager
def _head_set_aside(lm):
    head = lm.get_output_embeddings()
    lm.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        lm.set_output_embeddings(head)


def response_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the labelled (response) tokens, logits computed for those alone."""
    labels = batch["labels"]
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    lm = _causal_lm(model)
    with _head_set_aside(lm) as head:
        hidden = model(**inputs).logits  # the final hidden states: the head is an identity now
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][scored]).float()
    return torch.nn.functional.cross_entropy(logits, targets[scored])


class TrainingLoss:
    """model(batch) -> loss: response-only logits where they match the model's own loss."""

    def __init__(self, model, *, encoder_decoder: bool, sharded: bool) -> None:
        self.model = model
        lm = _causal_lm(model)
        self.fast = (
            not encoder_decoder
            and not sharded
            and lm.get_output_embeddings() is not None
            and hasattr(lm, "set_output_embeddings")
        )
        self.checked = not self.fast
        self.mismatch: str | None = None

    def __call__(self, batch: dict) -> torch.Tensor:
        if not self.fast:
            return self.model(**batch).loss
        if not self.checked:
            self.checked = True
            with torch.no_grad():
                reference, fast = float(self.model(**batch).loss), float(response_loss(self.model, batch))
            if abs(fast - reference) > AGREEMENT * max(1.0, abs(reference)):
                self.fast = False
                self.mismatch = f"response-only loss {fast:.4f} != the model's {reference:.4f}: using the model's"
                return self.model(**batch).loss
        return response_loss(self.model, batch)
