"""Target engines: `hf` (transformers) and `vllm`. Both give the rollout the same contract: `tokenizer`,
`describe()`, `features(batch)` and `generate(conversations, ...)`."""

from __future__ import annotations

from dataflow.errors import InputError
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig

ENGINES = ("hf", "vllm")


def open_engine(name: str, config: HFEngineConfig, *, max_model_len: int, verbose: bool = False):
    """The engine called `name`. `max_model_len` bounds a vLLM request (prompt + generated tokens)."""
    if name == "hf":
        return HFEngine(config)
    if name == "vllm":
        from dataflow.rollout.engines.hf import resolved_device
        from dataflow.rollout.engines.vllm import VLLMEngine

        return VLLMEngine(resolved_device(config), max_model_len=max_model_len, verbose=verbose)
    raise InputError(f"--engine {name!r}: unknown engine; pass one of {', '.join(ENGINES)}")
