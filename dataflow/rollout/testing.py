"""Tokenizers for tests: the real SmolLM2 one (ChatML template) and a Llama-3-style variant."""

from __future__ import annotations

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from dataflow.target import resolve_target

    return AutoTokenizer.from_pretrained(resolve_target())


def llama3_style_tokenizer():
    """The SmolLM2 tokenizer with Llama 3's header tokens and chat template."""
    tokenizer = smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL_TOKENS})
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def tiny_engine(model_dir, **options):
    """An fp32 HF engine on one thread over the tiny target in `model_dir` (built there if missing)."""
    from pathlib import Path

    from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig
    from dataflow.testing import build_tiny_target

    if not (Path(model_dir) / "config.json").exists():
        build_tiny_target(model_dir)
    return HFEngine(HFEngineConfig(model_dir=Path(model_dir), threads=1, dtype="float32", **options))


def rollout_in_process(run_dir, engine, **options):
    """`run_rollout` into run_dir/run.sqlite with a files store (12 samples unless told); (conn, config, stats)."""
    from dataflow.control.db import connect
    from dataflow.rollout.config import RolloutConfig
    from dataflow.rollout.producer import run_rollout
    from dataflow.rollout.ui import RolloutView

    conn = connect(run_dir / "run.sqlite")
    config = RolloutConfig(store="files", store_dir=run_dir / "features", **{"num_samples": 12, **options})
    return conn, config, run_rollout(conn, config, engine, RolloutView(enabled=False))
