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
