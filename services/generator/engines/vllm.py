"""vLLM inside a Serve replica (GPU). A thin adapter typed against vLLM's offline API (`vllm.LLM`,
`vllm.SamplingParams`); it cannot run on CPU-only machines, so its tests use a stand-in module at
this boundary. Switching to the next round's weights happens here, in the engine: the old engine is
put to sleep (its GPU memory freed) and a new one is built for the new checkpoint."""

from __future__ import annotations

import gc
import threading

from ...common.models import resolve_model
from .base import Completion, SamplingParams


class VLLMEngine:
    def __init__(self, *, gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1, dtype: str = "auto",
                 trust_remote_code: bool = False, cache_dir: str = "~/.cache/reinstruct/builtin",
                 max_model_len: int | None = None, batch_size: int | None = None, **_ignored) -> None:
        import vllm  # the optional extra: pip install 'reinstruct[vllm]'

        self._vllm = vllm
        self.options = dict(gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            dtype=dtype, trust_remote_code=trust_remote_code, enable_sleep_mode=True)
        if max_model_len:
            self.options["max_model_len"] = max_model_len
        self.cache_dir = cache_dir
        self.model_uri: str | None = None
        self.llm = None
        self._lock = threading.Lock()

    def load(self, model_uri: str) -> None:
        with self._lock:
            if model_uri == self.model_uri:
                return
            if self.llm is not None:
                self.llm.sleep(level=2)  # drop weights and KV cache before the next engine claims the GPU
                self.llm = None
                gc.collect()
            self.llm = self._vllm.LLM(model=resolve_model(model_uri, self.cache_dir), **self.options)
            self.model_uri = model_uri

    def _params(self, params: SamplingParams, **extra):
        return self._vllm.SamplingParams(
            temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=params.max_new_tokens, stop=list(params.stop) or None, seed=params.seed,
            presence_penalty=params.presence_penalty, **extra)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        with self._lock:
            outputs = self.llm.generate(prompts, self._params(params), use_tqdm=False)
        completions = []
        for output in outputs:
            best = output.outputs[0]
            completions.append(Completion(best.text, "length" if best.finish_reason == "length" else "stop",
                                          len(best.token_ids)))
        return completions

    def score_nll(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Mean NLL of each response's tokens from vLLM's prompt log-probs over prompt + response."""
        tokenizer = self.llm.get_tokenizer()
        scoring = SamplingParams(temperature=0.0, max_new_tokens=1)
        with self._lock:
            outputs = self.llm.generate([p + r for p, r in zip(prompts, responses)],
                                        self._params(scoring, prompt_logprobs=0), use_tqdm=False)
        losses = []
        for prompt, output in zip(prompts, outputs):
            n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            picked = [next(iter(lp.values())).logprob for lp in output.prompt_logprobs[n_prompt:] if lp]
            losses.append(-sum(picked) / max(len(picked), 1))
        return losses
