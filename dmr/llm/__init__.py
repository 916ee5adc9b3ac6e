"""LLM backends behind one protocol. The config's `backend.name` picks the module."""
from __future__ import annotations

import importlib

from dmr.llm.base import Backend, Generation, Sampling, Scored  # noqa: F401

BACKENDS = {
    "hf": "dmr.llm.hf:HFBackend",
    "vllm": "dmr.llm.vllm:VLLMBackend",
}


def load(name: str, model: str, **kwargs) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, **kwargs)
