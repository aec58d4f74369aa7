"""HF vs vLLM as the rollout's target engine: the same prompts and samples, in one run, one torch thread
setting for both (--threads, default 1: OMP_NUM_THREADS and torch.set_num_threads, set before either starts).

    regeneration  each engine's batched greedy `generate` on the first user turn of N bundled conversations;
                  tokens/s counts the reply tokens (the replies re-tokenised, the same count for both)
    capture       each engine's `features` over the N tokenised conversations, in the rollout's token-budget
                  batches; samples/s, and the max abs difference of aux_hidden/target_hidden between engines
    hand-over     vLLM only: time from vLLM's KV cache to our feature tensors (flush step, gather, final norm,
                  device -> CPU), as % of its forward time; no tensor is pickled (in-process engine core)

HF runs first: vLLM's CPU worker pins OpenMP threads and disables torch.set_num_threads in the process it
starts in. vLLM's start-up (s) is reported, not counted in the rates. Prints one JSON object last:
regen_speedup_vs_hf (target >= 5), capture_speedup_vs_hf, max_abs_diff.

    python scripts/bench_engines.py                 # 32 conversations of SmolLM2, 64 new tokens, 1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32, help="32: the rollout regenerates a lease group of 32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target-model", default=None, help="HF dir or .gguf (default: bundled SmolLM2)")
    return parser.parse_args()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(engine, conversations, batches, max_new_tokens: int) -> dict:
    replies, regen_s = timed(engine.generate, conversations, max_new_tokens=max_new_tokens, temperature=0.0)
    features, capture_s = timed(lambda: [f for batch in batches for f in engine.features(batch)])
    tokens = sum(len(engine.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {
        "replies": replies,
        "features": features,
        "regen_tokens": tokens,
        "regen_tokens_per_s": tokens / regen_s,
        "capture_samples_per_s": len(features) / capture_s,
        "capture_tokens_per_s": sum(len(f["input_ids"]) for f in features) / capture_s,
    }


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    from dataflow.rollout.data import load_dataset
    from dataflow.rollout.engines import open_engine
    from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig, token_budget_batches
    from dataflow.rollout.template import tokenize_sample
    from dataflow.target import resolve_target

    torch.set_num_threads(args.threads)
    config = HFEngineConfig(model_dir=resolve_target(args.target_model), threads=args.threads)
    samples = [s for s in load_dataset(None, "skip").samples if s.messages][: args.samples]
    conversations = [[next(m for m in s.messages if m["role"] == "user")] for s in samples]

    hf = HFEngine(config)
    tokenized = [t for s in samples if (t := tokenize_sample(hf.tokenizer, s, max_length=args.max_length))]
    batches = token_budget_batches(tokenized, args.token_budget)
    print(f"hf: {len(conversations)} replies, {len(tokenized)} captures ...", file=sys.stderr)
    hf_result = measure(hf, conversations, batches, args.max_new_tokens)
    del hf

    vllm, startup_s = timed(open_engine, "vllm", config, max_model_len=args.max_length + args.max_new_tokens)
    print(f"vllm: started in {startup_s:.1f}s ...", file=sys.stderr)
    vllm_result = measure(vllm, conversations, batches, args.max_new_tokens)

    max_abs = max_rel = 0.0
    for a, b in zip(hf_result["features"], vllm_result["features"], strict=True):
        for name in ("aux_hidden", "target_hidden"):
            diff = (a[name] - b[name]).abs().max().item()
            max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / a[name].abs().max().item())
    result = {
        "target": str(config.model_dir),
        "threads": args.threads,
        "samples": len(tokenized),
        "max_new_tokens": args.max_new_tokens,
        "hf_regen_tokens_per_s": round(hf_result["regen_tokens_per_s"], 1),
        "vllm_regen_tokens_per_s": round(vllm_result["regen_tokens_per_s"], 1),
        "regen_replies_equal": sum(a == b for a, b in zip(hf_result["replies"], vllm_result["replies"])),
        "hf_capture_samples_per_s": round(hf_result["capture_samples_per_s"], 2),
        "vllm_capture_samples_per_s": round(vllm_result["capture_samples_per_s"], 2),
        "vllm_handover_pct_of_forward": round(100 * vllm.handover_s / vllm.forward_s, 2),
        "vllm_startup_s": round(startup_s, 1),
        "max_rel_diff": max_rel,
        "regen_speedup_vs_hf": round(vllm_result["regen_tokens_per_s"] / hf_result["regen_tokens_per_s"], 2),
        "capture_speedup_vs_hf": round(vllm_result["capture_samples_per_s"] / hf_result["capture_samples_per_s"], 2),
        "max_abs_diff": max_abs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
