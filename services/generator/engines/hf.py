"""transformers `generate`, batched with left padding; CPU or GPU."""

from __future__ import annotations

import threading

import torch

from ...common.models import load_model
from .base import Completion, SamplingParams


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class HFEngine:
    def __init__(self, *, batch_size: int = 16, device: str | None = None, trust_remote_code: bool = False,
                 cache_dir: str = "~/.cache/reinstruct/builtin") -> None:
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trust_remote_code = trust_remote_code
        self.cache_dir = cache_dir
        self.model_uri: str | None = None
        self.model = None
        self.tokenizer = None
        self._lock = threading.Lock()

    def load(self, model_uri: str) -> None:
        with self._lock:
            if model_uri == self.model_uri:
                return
            self.model, self.tokenizer = load_model(
                model_uri, trust_remote_code=self.trust_remote_code, cache_dir=self.cache_dir, device=self.device
            )
            self.model_uri = model_uri

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        if self.model is None:
            raise RuntimeError("no model loaded: call load(model_uri) first")
        with self._lock:
            torch.manual_seed(params.seed)
            results: list[Completion] = []
            for start in range(0, len(prompts), self.batch_size):
                results.extend(self._generate_batch(prompts[start : start + self.batch_size], params))
            return results

    def _generate_batch(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        tok = self.tokenizer
        tok.padding_side = "right" if self.is_encoder_decoder else "left"
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens, do_sample=sampling, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        with torch.no_grad():
            output = self.model.generate(**batch, **kwargs)
        new_tokens = output if self.is_encoder_decoder else output[:, batch["input_ids"].shape[1] :]
        completions = []
        for row in new_tokens:
            ids = row.tolist()
            if self.is_encoder_decoder and ids and ids[0] == self.model.config.decoder_start_token_id:
                ids = ids[1:]
            ended = tok.eos_token_id in ids
            if ended:
                ids = ids[: ids.index(tok.eos_token_id)]
            ids = [i for i in ids if i != tok.pad_token_id]
            text, stopped = _cut_at_stop(tok.decode(ids, skip_special_tokens=True), params.stop)
            completions.append(Completion(text, "stop" if (ended or stopped) else "length", len(ids)))
        return completions

    def score_nll(self, prompts: list[str], responses: list[str]) -> list[float]:
        with self._lock, torch.no_grad():
            losses = []
            for prompt, response in zip(prompts, responses):
                prompt_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
                response_ids = self.tokenizer(response, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
                if self.is_encoder_decoder:
                    out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device),
                                     labels=torch.tensor([response_ids], device=self.device))
                else:
                    ids = torch.tensor([prompt_ids + response_ids], device=self.device)
                    labels = torch.tensor([[-100] * len(prompt_ids) + response_ids], device=self.device)
                    out = self.model(input_ids=ids, labels=labels)
                losses.append(float(out.loss))
            return losses
