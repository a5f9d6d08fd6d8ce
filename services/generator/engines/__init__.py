"""Generation engines behind one small interface, chosen by name (OpenRLHF's factory shape)."""

from __future__ import annotations

from .base import Completion, GenerationEngine, SamplingParams


def create_engine(name: str, **options) -> GenerationEngine:
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(**options)
    raise ValueError(f"unknown generation engine {name!r}; available: hf")


__all__ = ["Completion", "GenerationEngine", "SamplingParams", "create_engine"]
