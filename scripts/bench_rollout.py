"""The rollout's target work in fp32 and bf16, in one run, on the same batches and threads.

    forward      `HFEngine.features` over token-budget batches of the bundled conversations (what every
                 sample costs)
    generate     `HFEngine.generate` of greedy replies (what --regenerate and self-written prompts cost)
    sampled      bf16 only: `HFEngine.generate` at temperature 0.7 against transformers' stock sampled
                 `generate` (torch.multinomial, the model's fused attention) on the same prompts: what
                 --regenerate --temperature writes per second

The alternatives alternate round by round so that noise from a shared machine hits both alike. Prints one
JSON object last: tokens/s of each, `bf16_forward_speedup`, `bf16_generate_speedup`, how far the bf16
features are from the fp32 ones (relative error of target_hidden), and `sampled_speedup_vs_stock`.

    python scripts/bench_rollout.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from dataflow.rollout.data import load_dataset
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig, token_budget_batches
from dataflow.rollout.template import tokenize_sample
from dataflow.target import resolve_target


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stock_sampled_generate(engine: HFEngine, conversations, *, max_new_tokens: int, temperature: float) -> list[str]:
    """transformers' own sampling and SDPA attention on the engine's model and prompts (left-padded, like it)."""
    tokenizer = engine.tokenizer
    encoded = engine.left_padded(engine.rendered(conversations))
    ours = engine.model.config._attn_implementation
    engine.model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            out = engine.model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=None,
                top_k=None, pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        engine.model.set_attn_implementation(ours)
    return tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-model", default=None, help="HF dir or .gguf (default: bundled SmolLM2).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=16, help="Conversations per generate() batch.")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sampled-prompts", type=int, default=64, help="Replies per sampled batch (a lease).")
    parser.add_argument("--sampled-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model_dir = resolve_target(args.target_model)
    engines = {
        dtype: HFEngine(HFEngineConfig(model_dir=model_dir, dtype=dtype, threads=args.threads))
        for dtype in ("float32", "bfloat16")
    }
    tokenizer = engines["float32"].tokenizer
    samples = load_dataset().samples[: args.samples]
    tokenized = [tokenize_sample(tokenizer, s, max_length=args.max_length) for s in samples]
    batches = token_budget_batches([t for t in tokenized if t], args.token_budget)
    tokens = sum(len(t.input_ids) for b in batches for t in b)
    prompts = [[m for m in s.messages[:1]] for s in samples[: args.prompts]]

    forward_s = {dtype: [] for dtype in engines}
    generate_s = {dtype: [] for dtype in engines}
    generated = {}
    for _ in range(args.rounds):
        for dtype, engine in engines.items():
            forward_s[dtype].append(timed(lambda: [engine.features(b) for b in batches]))
            replies = []
            generate_s[dtype].append(timed(lambda: replies.extend(
                engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=0.0))))
            generated[dtype] = sum(len(tokenizer(r)["input_ids"]) for r in replies)

    sampled_prompts = [[m for m in s.messages[:1]] for s in load_dataset().samples[: args.sampled_prompts]]
    bf16 = engines["bfloat16"]
    sampled_writers = {"engine": bf16.generate, "stock": partial(stock_sampled_generate, bf16)}
    sampled_rates = {name: [] for name in sampled_writers}
    for round_ in range(args.rounds):
        for name, write in sampled_writers.items():
            torch.manual_seed(round_)
            replies = []
            seconds = timed(lambda: replies.extend(
                write(sampled_prompts, max_new_tokens=args.sampled_new_tokens, temperature=0.7)))
            sampled_rates[name].append(sum(len(tokenizer(r)["input_ids"]) for r in replies) / seconds)

    [exact] = engines["float32"].features(batches[0][:1])
    [low] = engines["bfloat16"].features(batches[0][:1])
    rel_err = ((low["target_hidden"].float() - exact["target_hidden"]).norm() / exact["target_hidden"].norm()).item()
    best_forward = {dtype: min(times) for dtype, times in forward_s.items()}
    best_generate = {dtype: min(times) for dtype, times in generate_s.items()}
    result = {
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "forward_tokens": tokens,
        "forward_tokens_per_s": {d: round(tokens / s, 1) for d, s in best_forward.items()},
        "generate_tokens_per_s": {d: round(generated[d] / s, 1) for d, s in best_generate.items()},
        "bf16_forward_speedup": round(best_forward["float32"] / best_forward["bfloat16"], 3),
        "bf16_generate_speedup": round(best_generate["float32"] / best_generate["bfloat16"], 3),
        "bf16_target_hidden_rel_error": round(rel_err, 5),
        "sampled_prompts": len(sampled_prompts),
        "sampled_tokens_per_s": {name: round(max(rates), 1) for name, rates in sampled_rates.items()},
        "sampled_speedup_vs_stock": round(max(sampled_rates["engine"]) / max(sampled_rates["stock"]), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
