"""Leased refs in, padded micro-batches out.

Refs are leased one at a time in id order and packed greedily into micro-batches under a token budget
(padding included). A sample that does not fit the last micro-batch of a step stays leased and opens the
next step. Nothing is acked here before the optimiser step that used it: the trainer acks afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from dataflow.control.queue import Lease, RefQueue
from dataflow.errors import FeaturesLost, InputError

FEATURES = ("input_ids", "loss_mask", "aux_hidden", "target_hidden")
FILL_POLL_S = 0.05


@dataclass(frozen=True)
class LeasedSample:
    """A leased ref and its sample's features, opened from the store."""

    lease: Lease
    features: dict[str, torch.Tensor]  # zero-copy views until collated

    @property
    def length(self) -> int:
        return int(self.features["input_ids"].shape[0])


@dataclass(frozen=True)
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) int64
    loss_mask: torch.Tensor  # (B, T) bool
    aux_hidden: torch.Tensor  # (B, T, 3H)
    target_hidden: torch.Tensor  # (B, T, H)


def fits(batch: list[LeasedSample], sample: LeasedSample, budget: int) -> bool:
    longest = max([s.length for s in batch] + [sample.length])
    return not batch or (len(batch) + 1) * longest <= budget


def check_features(sample: LeasedSample, *, aux_width: int, hidden_width: int) -> None:
    f = sample.features
    missing = [name for name in FEATURES if name not in f]
    if missing:
        raise InputError(f"sample {sample.lease.key}: features {missing} missing; is the producer an EAGLE3 rollout?")
    T = sample.length
    if f["aux_hidden"].shape != (T, aux_width) or f["target_hidden"].shape != (T, hidden_width):
        raise InputError(
            f"sample {sample.lease.key}: aux_hidden {tuple(f['aux_hidden'].shape)}, target_hidden "
            f"{tuple(f['target_hidden'].shape)} but the draft expects ({T}, {aux_width}) and ({T}, {hidden_width}); "
            "fix --draft-config (target_hidden_size) or use the run's target"
        )


def collate(samples: list[LeasedSample], device: torch.device, float_dtype: torch.dtype) -> MicroBatch:
    """Right-pad and copy onto the device (the copy ends the zero-copy views' use)."""
    B, T = len(samples), max(s.length for s in samples)
    first = samples[0].features
    ids = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    aux = torch.zeros(B, T, first["aux_hidden"].shape[-1], dtype=float_dtype)
    hidden = torch.zeros(B, T, first["target_hidden"].shape[-1], dtype=float_dtype)
    for b, s in enumerate(samples):
        n = s.length
        ids[b, :n], mask[b, :n] = s.features["input_ids"], s.features["loss_mask"]
        aux[b, :n], hidden[b, :n] = s.features["aux_hidden"], s.features["target_hidden"]
    return MicroBatch(*(t.to(device, non_blocking=True) for t in (ids, mask, aux, hidden)))


class RefSource:
    def __init__(self, queue: RefQueue, reader, *, owner: str, partition: tuple[int, int], lease_ttl: float):
        self.queue, self.reader = queue, reader
        self.owner, self.partition, self.lease_ttl = owner, partition, lease_ttl
        self.carry: LeasedSample | None = None  # leased and opened, first of the next step
        self.held: dict[str, Lease] = {}  # token -> lease, everything leased and not yet acked
        self.lost = 0
        self._last_extend = time.monotonic()

    def next_sample(self) -> LeasedSample | None:
        """The next readable ref, or None when nothing is pending. Unreadable refs become LOST."""
        if self.carry is not None:
            sample, self.carry = self.carry, None
            return sample
        while True:
            leases = self.queue.lease(self.owner, n=1, ttl=self.lease_ttl, partition=self.partition)
            if not leases:
                return None
            lease = leases[0]
            self.held[lease.token] = lease
            try:
                return LeasedSample(lease=lease, features=self.reader.open(lease.handle))
            except FeaturesLost as e:
                self.drop(lease, str(e))

    def drop(self, lease: Lease, error: str) -> None:
        self.queue.mark_lost(lease.token, error)
        self.held.pop(lease.token, None)
        self.lost += 1

    def step_batch(self, *, grad_accum: int, batch_tokens: int, fill_wait_s: float = 0.0,
                   stream_open: Callable[[], bool] = lambda: False) -> list[list[LeasedSample]]:
        """Up to grad_accum micro-batches. When the queue runs dry mid-step while the stream is open, wait
        up to fill_wait_s for more, then train on what there is (a producer held back by the byte
        watermark may be waiting for our acks)."""
        micro: list[list[LeasedSample]] = [[]]
        deadline = None
        while True:
            sample = self.next_sample()
            if sample is None:
                if not micro[0] or not stream_open():
                    break
                deadline = deadline or time.monotonic() + fill_wait_s
                if time.monotonic() >= deadline:
                    break
                self.keep_alive()
                time.sleep(FILL_POLL_S)
                continue
            if fits(micro[-1], sample, batch_tokens):
                micro[-1].append(sample)
            elif len(micro) < grad_accum:
                micro.append([sample])
            else:
                self.carry = sample
                break
        return [mb for mb in micro if mb]

    def confirm(self, samples: list[LeasedSample]) -> list[LeasedSample]:
        """After collation: drop samples whose bytes were reused meanwhile (only if our lease lapsed)."""
        kept = []
        for s in samples:
            try:
                self.reader.check(s.lease.handle)
                kept.append(s)
            except FeaturesLost as e:
                self.drop(s.lease, str(e))
        return kept

    def ack(self, samples: list[LeasedSample]) -> list[int]:
        """Ack after the optimiser step; returns the ref ids acked (a lapsed lease is not ours to ack)."""
        tokens = [s.lease.token for s in samples]
        stale = set(self.queue.ack(tokens))
        for t in tokens:
            self.held.pop(t, None)
        return [s.lease.id for s in samples if s.lease.token not in stale]

    def keep_alive(self) -> None:
        if self.held and time.monotonic() - self._last_extend > self.lease_ttl / 4:
            for token in self.queue.extend(list(self.held), self.lease_ttl):
                self.held.pop(token, None)
            self._last_extend = time.monotonic()

    def give_back(self, reason: str) -> None:
        """Stopping: what we hold goes back untried (not a failure of those samples)."""
        if self.held:
            self.queue.release(list(self.held), reason)
        self.held.clear()
        self.carry = None
