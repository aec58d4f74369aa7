"""A tiny random Llama target, saved as an HF directory, for tests, chaos runs and benchmarks."""

from __future__ import annotations

from pathlib import Path


def build_tiny_target(
    out_dir: Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 7,  # the fewest whose default EAGLE3 aux layers (2, N//2, N-3) are distinct
    tie_word_embeddings: bool = False,
    head_scale: float = 1.0,
    seed: int = 0,
) -> Path:
    """vocab_size None: the real SmolLM2 tokenizer (and its chat template) is saved beside the weights and
    sets the vocabulary; otherwise weights only. head_scale > 1 makes the teacher confident, like a trained
    model (a random init is near-uniform)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = None
    if vocab_size is None:
        from dataflow.rollout.testing import smollm2_tokenizer

        tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        **({} if tokenizer is None else {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
