"""The draft vocabulary: the `draft_vocab_size` tokens the target is most likely to be asked to predict.

Ranked by (1) how often a token is a trained (loss-masked) token of the replies counted, which with
--regenerate are the target's own; for the slots the replies do not fill, (2) how often it occurs
anywhere in the run's conversations (words the target reads and echoes: the best predictor of the
replies still to come, measured by scripts/bench_vocab.py); (3) with --regenerate, how often it was among
the target's top-5 candidates while writing the counted replies; only then (4) the lowest ids. Recorded in
the run as a VocabRecord (dataflow/records.py): d2t[i] = target_id - draft_id for draft id i, draft ids
sorted by target id (the EAGLE3 checkpoint layout), plus how well it covers the counted replies; t2d is
derived from d2t by the reader.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Sequence

from dataflow.records import VocabRecord
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


def draft_vocab(
    counts: Counter, vocab_size: int, draft_vocab_size: int, fallbacks: Sequence[Counter] = ()
) -> VocabRecord:
    """The top tokens by `counts`, then by each of `fallbacks` in turn (ties: lower id first), topped up
    with the lowest ids seen in none; with the share of the counted tokens it covers."""
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in 1..{vocab_size}, got {draft_vocab_size}")
    candidates = set(counts).union(*fallbacks)
    ranked = sorted(
        (t for t in candidates if 0 <= t < vocab_size), key=lambda t: (-counts[t], *(-f[t] for f in fallbacks), t)
    )
    chosen = set(ranked[:draft_vocab_size])
    filler = (t for t in range(vocab_size) if t not in chosen)
    while len(chosen) < draft_vocab_size:
        chosen.add(next(filler))
    total = sum(counts.values())
    return VocabRecord.from_target_ids(
        list(chosen), counted_tokens=total, distinct_counted=len(counts),
        coverage=round(sum(counts[t] for t in chosen) / total, 5) if total else None,
    )


def covered(input_ids: Iterable[int], loss_mask: Iterable[bool], vocab_ids: frozenset[int]) -> tuple[int, int]:
    """(trained tokens inside the draft vocabulary, trained tokens) of one sample."""
    trained = [t for t, m in zip(input_ids, loss_mask) if m]
    return sum(t in vocab_ids for t in trained), len(trained)
