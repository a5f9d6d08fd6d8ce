"""transformers `generate`, batched with left padding; CPU or GPU."""

from __future__ import annotations

import copy
import threading

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .. import deadline
from ..config import GenerationConfig
from ..models import DEFAULT_CACHE_DIR, load_model
from ..rendering import IGNORE_INDEX, NO_LIMIT, Example, encode_prompt, tokenize
from .base import Completion, ModelSessions, SamplingParams, continuation_tokens, labelled_sum


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    positions = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True


class PresencePenalty(LogitsProcessor):
    """OpenAI's / vLLM's presence penalty: a flat subtraction from the logit of every token that
    already occurs in the completion (not the prompt). Self-Instruct uses 2 for instructions, so a
    model does not write the same task six times in one list."""

    def __init__(self, penalty: float, prompt_len: int) -> None:
        self.penalty, self.prompt_len = penalty, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        present = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * present.to(scores.dtype)


class DeadlineStop(StoppingCriteria):
    """Ends a batch's generation once its request has run past its budget (services.common.deadline)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), deadline.expired(), dtype=torch.bool, device=input_ids.device)


class HFEngine(ModelSessions):
    def __init__(
        self,
        *,
        batch_size: int = GenerationConfig().batch_size,
        device: str | None = None,
        trust_remote_code: bool = False,
        cache_dir: str = DEFAULT_CACHE_DIR,
        torch_threads: int = 0,
    ) -> None:
        if torch_threads:  # replicas sharing a machine: one thread each scales better than all fighting over all
            torch.set_num_threads(torch_threads)
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trust_remote_code = trust_remote_code
        self.cache_dir = cache_dir
        self.model_uri: str | None = None
        self.model = None
        self.tokenizer = None
        self._lock = threading.RLock()

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
                deadline.check()
                results.extend(self._generate_batch(prompts[start : start + self.batch_size], params))
            deadline.check()  # a batch cut short by DeadlineStop is no answer
            return results

    def _generate_batch(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        tok = self.tokenizer
        ids = [
            encode_prompt(tok, p, encoder_decoder=self.is_encoder_decoder, max_len=params.max_prompt_tokens)
            for p in prompts
        ]
        tok.padding_side = "right" if self.is_encoder_decoder else "left"
        batch = tok.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        sampling = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.stop:  # a sequence that wrote a stop string is finished: the batch ends when all are
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        kwargs["stopping_criteria"] = StoppingCriteriaList([DeadlineStop()])
        if params.presence_penalty:
            prompt_len = 1 if self.is_encoder_decoder else batch["input_ids"].shape[1]
            kwargs["logits_processor"] = LogitsProcessorList([PresencePenalty(params.presence_penalty, prompt_len)])
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
            text, stopped = cut_at_stop(tok.decode(ids, skip_special_tokens=True), params.stop)
            completions.append(Completion(text, "stop" if (ended or stopped) else "length", len(ids)))
        return completions

    def score_nll(self, prompts: list[str], responses: list[str], max_len: int = 0) -> list[float]:
        with self._lock, torch.no_grad():
            losses = []
            for prompt, response in zip(prompts, responses):
                deadline.check()
                features = tokenize(
                    Example(prompt, response, "", ""), self.tokenizer, max_len or NO_LIMIT, self.is_encoder_decoder
                )
                out = self.model(
                    input_ids=torch.tensor([features["input_ids"]], device=self.device),
                    labels=torch.tensor([features["labels"]], device=self.device),
                )
                losses.append(float(out.loss))
            return losses

    def logprob_of_continuations(self, prompt: str, continuations: list[str]) -> list[float]:
        with self._lock, torch.no_grad():
            deadline.check()
            features = [continuation_tokens(self.tokenizer, prompt, c, self.is_encoder_decoder) for c in continuations]
            if self.is_encoder_decoder:
                return [self._decoder_logprob(f) for f in features]
            return self._shared_prefix_logprobs(features)

    def _decoder_logprob(self, features: dict) -> float:
        if not features["labels"]:
            return 0.0
        out = self.model(
            input_ids=torch.tensor([features["input_ids"]], device=self.device),
            labels=torch.tensor([features["labels"]], device=self.device),
        )
        logprobs = torch.log_softmax(out.logits[0].float(), -1)
        return float(sum(logprobs[j, token] for j, token in enumerate(features["labels"])))

    def _shared_prefix_logprobs(self, features: list[dict]) -> list[float]:
        """The tokens all continuations share before their first own token (the rendered prompt, a long
        rubric) run once; each continuation's own tokens then run on a copy of that cache. A rating's
        five one-token continuations cost one forward pass of the prompt."""
        ids = [f["input_ids"] for f in features]
        if not ids or not all(ids):
            return [0.0 for _ in features]
        starts = [
            next((j for j, label in enumerate(f["labels"]) if label != IGNORE_INDEX), len(f["labels"]))
            for f in features
        ]
        shared = 0
        while shared < min(starts) and all(len(i) > shared and i[shared] == ids[0][shared] for i in ids):
            shared += 1
        shared = max(shared, 1)  # the first token has no log-prob (nothing before it)
        prefix = self.model(input_ids=torch.tensor([ids[0][:shared]], device=self.device), use_cache=True)
        after_prefix = torch.log_softmax(prefix.logits[0, -1].float(), -1)
        sums = []
        for f in features:
            rest = f["input_ids"][shared:]
            logprobs: list[float | None] = [None] * shared
            if rest:
                logprobs.append(float(after_prefix[rest[0]]))
            if len(rest) > 1:
                step = self.model(
                    input_ids=torch.tensor([rest[:-1]], device=self.device),
                    past_key_values=copy.deepcopy(prefix.past_key_values),
                    use_cache=True,
                )
                step_logprobs = torch.log_softmax(step.logits[0].float(), -1)
                logprobs += [float(step_logprobs[j, token]) for j, token in enumerate(rest[1:])]
            sums.append(labelled_sum(f["labels"], logprobs))
        return sums
