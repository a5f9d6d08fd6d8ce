"""The training loss with logits only where they are scored.

A causal LM's head maps every position to the whole vocabulary (49k for SmolLM2: about a fifth of a
step's FLOPs and most of its memory traffic), and the loss then ignores every position outside the
responses. Here the model runs with its head set aside, the head runs on the response positions
alone, and the loss is the same token-mean cross-entropy transformers computes.

The model's own forward may do more after its head (Gemma 2's soft-capping, Granite's scaling, a
mixture of experts' router loss): such models, encoder-decoders and FSDP-sharded ones (their root
parameters are gathered only inside the root's forward) keep the model's own loss, and the first
batch checks the fast loss against `model(**batch).loss` for every other.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..common.rendering import IGNORE_INDEX

AGREEMENT = 1e-5  # relative, in fp32 without autocast: the two paths agree to rounding
# config attributes of models whose loss is more than the head's cross-entropy, or whose logits are
# transformed after the head: they keep the model's own loss (the first-batch check may miss them
# when the transform is small at initialization)
OWN_LOSS_ATTRIBUTES = ("output_router_logits", "final_logit_softcapping", "logits_scaling", "logit_scale")


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
    """Mean cross-entropy over the labelled (response) tokens, logits computed for those alone.
    The head runs outside DDP's forward: fine with DDP's default find_unused_parameters=False (what
    Ray Train's prepare_model uses); with True, an untied head trained in full would be marked ready
    twice."""
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
        config = getattr(lm, "config", None)
        self.fast = (
            not encoder_decoder
            and not sharded
            and lm.get_output_embeddings() is not None
            and not any(getattr(config, name, None) for name in OWN_LOSS_ATTRIBUTES)
        )
        self.checked = not self.fast
        self.mismatch: str | None = None

    def _check(self, batch: dict) -> None:
        """Both losses on the first batch, in eval mode (no dropout) and fp32 (no autocast): a model
        whose forward needs its head module (Mamba reads lm_head.weight) or whose loss differs keeps
        its own."""
        self.checked = True
        training = self.model.training
        device = next(self.model.parameters()).device.type
        self.model.eval()
        try:
            with torch.no_grad(), torch.autocast(device, enabled=False):
                reference = float(self.model(**batch).loss)
                fast = float(response_loss(self.model, batch))
            if abs(fast - reference) > AGREEMENT * max(1.0, abs(reference)):
                self.mismatch = f"response-only loss {fast:.6f} != the model's {reference:.6f}: using the model's"
        except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: not for this model
            self.mismatch = f"response-only loss failed ({type(exc).__name__}: {exc}): using the model's"
        finally:
            self.model.train(training)
        self.fast = self.mismatch is None

    def __call__(self, batch: dict) -> torch.Tensor:
        if not self.checked:
            self._check(batch)
        return response_loss(self.model, batch) if self.fast else self.model(**batch).loss
