"""vLLM inside a Serve replica (GPU). A thin adapter typed against vLLM's offline API (`vllm.LLM`,
`vllm.SamplingParams`); it cannot run on CPU-only machines, so its tests use a stand-in module at
this boundary. Switching to the next round's weights happens here, in the engine: the old engine is
put to sleep (its GPU memory freed) and a new one is built for the new checkpoint.

vLLM gets token ids, never text: given text it would add BOS by its own rule, and the model would
see a different sequence from the one it was trained on (and score_nll would be a token off)."""

from __future__ import annotations

import gc
import threading

from ..models import DEFAULT_CACHE_DIR, load_tokenizer, resolve_model
from ..rendering import NO_LIMIT, Example, encode_prompt, mean_response_nll, tokenize
from .base import Completion, ModelSessions, SamplingParams


class VLLMEngine(ModelSessions):
    def __init__(
        self,
        *,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        cache_dir: str = DEFAULT_CACHE_DIR,
        max_model_len: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        import vllm  # the optional extra: pip install 'reinstruct[vllm]'

        self._vllm = vllm
        self.options = dict(
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            enable_sleep_mode=True,
        )
        if max_model_len:
            self.options["max_model_len"] = max_model_len
        self.cache_dir = cache_dir
        self.model_uri: str | None = None
        self.tokenizer = None
        self.llm = None
        self._lock = threading.RLock()

    def load(self, model_uri: str) -> None:
        with self._lock:
            if model_uri == self.model_uri:
                return
            if self.llm is not None:
                self.llm.sleep(level=2)  # drop weights and KV cache before the next engine claims the GPU
                self.llm = None
                gc.collect()
            path = resolve_model(model_uri, self.cache_dir)
            self.llm = self._vllm.LLM(model=path, **self.options)
            self.tokenizer = load_tokenizer(path, trust_remote_code=self.options["trust_remote_code"])
            self.model_uri = model_uri

    def _params(self, params: SamplingParams, **extra):
        return self._vllm.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            **extra,
        )

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        token_prompts = [
            {"prompt_token_ids": encode_prompt(self.tokenizer, p, max_len=params.max_prompt_tokens)} for p in prompts
        ]
        with self._lock:
            outputs = self.llm.generate(token_prompts, self._params(params), use_tqdm=False)
        completions = []
        for output in outputs:
            best = output.outputs[0]
            completions.append(
                Completion(best.text, "length" if best.finish_reason == "length" else "stop", len(best.token_ids))
            )
        return completions

    def score_nll(self, prompts: list[str], responses: list[str], max_len: int = 0) -> list[float]:
        """Mean NLL of the response tokens (training's labels) from vLLM's prompt log-probs."""
        features = [
            tokenize(Example(p, r, "", ""), self.tokenizer, max_len or NO_LIMIT, False)
            for p, r in zip(prompts, responses)
        ]
        scoring = SamplingParams(temperature=0.0, max_new_tokens=1)
        with self._lock:
            outputs = self.llm.generate(
                [{"prompt_token_ids": f["input_ids"]} for f in features],
                self._params(scoring, prompt_logprobs=0),
                use_tqdm=False,
            )
        return [
            mean_response_nll(
                f["input_ids"],
                f["labels"],
                [
                    None if lp is None else lp[token].logprob
                    for lp, token in zip(output.prompt_logprobs, f["input_ids"])
                ],
            )
            for f, output in zip(features, outputs)
        ]
