"""The draft vocabulary: the `draft_vocab_size` most frequent loss-masked target tokens.

Recorded in the run as {"draft_vocab_size", "d2t"} with d2t[i] = target_id - draft_id for draft id i,
draft ids sorted by target id (the EAGLE3 checkpoint layout); t2d is derived from d2t by the reader.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from dataflow.rollout.template import TokenizedSample


def count_tokens(samples: Iterable[TokenizedSample | None], on_sample: Callable[[], None] = lambda: None) -> Counter:
    """Frequencies of loss-masked tokens (of every token where nothing is masked, e.g. prompt-only rows)."""
    masked: Counter = Counter()
    everything: Counter = Counter()
    for sample in samples:
        on_sample()
        if sample is None:
            continue
        masked.update(t for t, m in zip(sample.input_ids, sample.loss_mask) if m)
        everything.update(sample.input_ids)
    return masked or everything


def draft_vocab(counts: Counter, vocab_size: int, draft_vocab_size: int) -> dict:
    """The top tokens by frequency (ties: lower id first), topped up with the lowest unseen ids."""
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in 1..{vocab_size}, got {draft_vocab_size}")
    ranked = sorted((t for t in counts if 0 <= t < vocab_size), key=lambda t: (-counts[t], t))
    chosen = set(ranked[:draft_vocab_size])
    filler = (t for t in range(vocab_size) if t not in chosen)
    while len(chosen) < draft_vocab_size:
        chosen.add(next(filler))
    target_ids = sorted(chosen)
    return {"draft_vocab_size": draft_vocab_size, "d2t": [t - d for d, t in enumerate(target_ids)]}


def target_ids_of(vocab: dict) -> list[int]:
    """Inverse view of d2t: the target id of each draft id."""
    return [d + offset for d, offset in enumerate(vocab["d2t"])]
