"""Held-out acceptance while training: a share of the prompts is never trained on, and the draft's per-step
accuracies and τ̂ on them are measured every --validate-every steps.

A prompt is held out by the hash of its key (`keys.prompt_of`), so all its replies and every epoch of them are
held out together, on every rank and in every incarnation of the trainer: holding out never depends on
arrival order, and a restart holds out the same prompts. Held-out refs are leased and acked like the others
(the run drains and exactly-once holds) but skip the optimiser; their features are copied into memory up to
a token budget. A restarted trainer starts with an empty set that fills again as held-out refs arrive (from
the stream, or from the next epoch's replay).
"""

from __future__ import annotations

import zlib

import torch

from dataflow.keys import EPOCH_MARK, prompt_of
from dataflow.train.loss import teacher, ttt_sums
from dataflow.train.source import LeasedSample, collate, fits

SHARE_RESOLUTION = 10_000


def held_out(key: str, share: float) -> bool:
    """Whether the prompt of ref `key` is one of the `share` of prompts kept out of training."""
    return zlib.crc32(prompt_of(key).encode()) % SHARE_RESOLUTION < share * SHARE_RESOLUTION


def packed(samples: list[LeasedSample], budget: int) -> list[list[LeasedSample]]:
    """Greedy packing under a token budget in the given order, as the trainer packs leased refs."""
    batches: list[list[LeasedSample]] = [[]]
    for sample in samples:
        if fits(batches[-1], sample, budget):
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return [b for b in batches if b]


def accuracy_sums(step, batches: list[list[LeasedSample]], ttt_length: int,
                  device: torch.device) -> tuple[list[float], list[float]]:
    """Per TTT step: (correct, count) of the draft's top-1 against the target's over `batches`, no gradient."""
    correct, count = [0.0] * ttt_length, [0.0] * ttt_length
    with torch.no_grad():
        for batch in batches:
            mb = collate(batch, device, step.dtype)
            t = teacher(mb.target_hidden, step.head, mb.loss_mask, step.teacher_core)
            normed = step.model.normed_states(mb.input_ids, mb.aux_hidden, ttt_length, step.ttt_step)
            sums = ttt_sums(step.model, normed, t, step.ce_core)
            for k in range(ttt_length):
                correct[k] += float(sums.correct[k])
                count[k] += sums.count[k]
    return correct, count


def base_key(sample: LeasedSample) -> str:
    """The sample a ref carries, whatever its epoch."""
    return sample.lease.key.split(EPOCH_MARK, 1)[0]


class ValidationSet:
    """The held-out samples this rank has seen, in memory, one copy per sample (its epochs are the same
    features), up to `max_tokens` tokens."""

    def __init__(self, share: float, max_tokens: int):
        self.share, self.max_tokens = share, max_tokens
        self.samples: dict[str, LeasedSample] = {}
        self.tokens = 0

    def wants(self, sample: LeasedSample) -> bool:
        return self.share > 0 and held_out(sample.lease.key, self.share)

    def copies(self, samples: list[LeasedSample]) -> list[LeasedSample]:
        """Copies of those `samples` it has room for and does not hold yet (the store's views end with the
        ack); `add` them once the store confirms their bytes did not change under the copy."""
        out, tokens, keys = [], self.tokens, set()
        for s in samples:
            key = base_key(s)
            if key in self.samples or key in keys or tokens + s.length > self.max_tokens:
                continue
            keys.add(key)
            tokens += s.length
            out.append(LeasedSample(lease=s.lease, features={name: t.clone() for name, t in s.features.items()}))
        return out

    def add(self, copies: list[LeasedSample]) -> None:
        for c in copies:
            self.samples[base_key(c)] = c
            self.tokens += c.length

    def accuracy_sums(self, step, batch_tokens: int, ttt_length: int,
                      device: torch.device) -> tuple[list[float], list[float]]:
        return accuracy_sums(step, packed(list(self.samples.values()), batch_tokens), ttt_length, device)
