"""Target engines: `hf` (transformers) and `vllm`. Both give the rollout the same contract: `tokenizer`,
`describe()`, `features(batch)`, `generate(conversations, ...)` and `complete(texts, ...)`."""

from __future__ import annotations

from dataflow.errors import InputError
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig

ENGINES = ("hf", "vllm")


def check_engine(name: str) -> None:
    if name not in ENGINES:
        raise InputError(f"--engine {name!r}: unknown engine; pass one of {', '.join(ENGINES)}")


def open_engine(name: str, config: HFEngineConfig, *, max_model_len: int, verbose: bool = False):
    """The engine called `name`. `max_model_len` bounds a vLLM request (prompt + generated tokens)."""
    check_engine(name)
    if name == "vllm":
        from dataflow.rollout.engines.vllm import VLLMEngine

        return VLLMEngine(config, max_model_len=max_model_len, verbose=verbose)
    return HFEngine(config)
