"""How well each way of choosing the draft vocabulary covers the tokens the target really writes.

The target regenerates the replies of the first N training rows of the bundled conversations (greedy, as
`--regenerate` does). The first half is what the vocabulary may be counted from (the warm-up), the second
half is what it is measured on (replies it never saw):

    dataset     the dataset's original replies of all training rows, topped up with the lowest ids (the
                old behaviour)
    own         the target's own replies of the warm-up half, then tokens seen anywhere in the training
                rows, then the lowest ids
    own+likely  the same with how often each token was among the target's top-5 candidates while it
                wrote the warm-up replies ranked before the seen tokens
    own+seen+likely  ... ranked after the seen tokens, before the lowest ids (what `dataflow rollout
                --regenerate` records)

Prints one JSON object last: per draft-vocabulary size and way, the coverage of the unseen half's trained
tokens and how many slots hold ids that occur in no counted text ("filler").

    python scripts/bench_vocab.py --samples 128 --sizes 2048,4096,8192
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.data import DEFAULT_HELD_OUT, load_dataset, split_held_out
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig
from dataflow.rollout.prepare import renderable
from dataflow.rollout.regenerate import regenerate_replies
from dataflow.records import VocabRecord
from dataflow.rollout.vocab import count_tokens, draft_vocab
from dataflow.target import resolve_target


def coverage(vocab: VocabRecord, counts: Counter) -> float:
    ids = set(vocab.target_ids())
    return round(sum(n for t, n in counts.items() if t in ids) / sum(counts.values()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-model", default=None, help="HF dir or .gguf (default: bundled SmolLM2).")
    parser.add_argument("--samples", type=int, default=128,
                        help="Rows regenerated (half counted, half measured); a multiple of 64.")
    parser.add_argument("--sizes", default="2048,4096,8192")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    engine = HFEngine(HFEngineConfig(model_dir=resolve_target(args.target_model), dtype=args.dtype,
                                     threads=args.threads))
    config = RolloutConfig(max_length=512)
    rows, _ = split_held_out(load_dataset().samples, DEFAULT_HELD_OUT)
    start = time.perf_counter()
    regenerated, contenders, half = [], torch.zeros(engine.vocab_size), args.samples // 2
    for i in range(0, args.samples, 32):  # batches of 32 stay on one side of the half when --samples is 64k
        regenerated += regenerate_replies(engine, rows[i : min(i + 32, args.samples)],
                                          max_new_tokens=args.max_new_tokens, temperature=0.0, seed=0,
                                          contenders=contenders if i < half else None)
    regenerate_s = time.perf_counter() - start
    warmup, unseen = regenerated[:half], count_tokens(renderable(engine, s, config) for s in regenerated[half:])
    dataset_replies = count_tokens(renderable(engine, s, config) for s in rows)
    seen = Counter(t for s in rows if (tok := renderable(engine, s, config)) for t in tok.input_ids)
    own_replies = count_tokens(renderable(engine, s, config) for s in warmup)
    likely = Counter({t: n for t, n in enumerate(contenders.tolist()) if n > 0})
    result = {"samples": len(regenerated), "regenerate_s": round(regenerate_s, 1),
              "regenerated_tokens": sum(unseen.values()) * 2, "distinct_in_own_replies": len(own_replies),
              "distinct_in_dataset_replies": len(dataset_replies), "sizes": {}}
    for size in map(int, args.sizes.split(",")):
        old = draft_vocab(dataset_replies, engine.vocab_size, size)
        own = draft_vocab(own_replies, engine.vocab_size, size, fallbacks=(seen,))
        likely_first = draft_vocab(own_replies, engine.vocab_size, size, fallbacks=(likely, seen))
        new = draft_vocab(own_replies, engine.vocab_size, size, fallbacks=(seen, likely))
        result["sizes"][size] = {
            "dataset": {"coverage_unseen": coverage(old, unseen), "filler": max(0, size - len(dataset_replies))},
            "own": {"coverage_unseen": coverage(own, unseen), "coverage_warmup": own["coverage"],
                    "filler": max(0, size - len(own_replies.keys() | seen.keys()))},
            "own+likely": {"coverage_unseen": coverage(likely_first, unseen)},
            "own+seen+likely": {"coverage_unseen": coverage(new, unseen), "coverage_warmup": new["coverage"]},
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
