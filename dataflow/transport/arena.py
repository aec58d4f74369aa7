"""Byte-range allocation over one mapped region, and the layout of one sample inside its range.

The allocator holds no state of its own that matters across processes: the writer re-derives the set of
used ranges from the live refs in SQLite (plus its own not-yet-committed writes) whenever an allocation
does not fit, which is how frees made by the trainer arrive. Next-fit with wrap-around: allocation
continues after the last one, so freed ranges are reused as late as possible (a ring buffer when frees
come in order; holes are still found when they come out of order).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch

ALIGN = 64  # every range and every tensor inside it starts on a cache line
RANGE_HEADER_BYTES = ALIGN  # per-range header: magic, generation, length (see shm.py)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}  # safetensors' names, so both stores describe dtypes the same way
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
T = TypeVar("T")


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """Where one tensor lives inside its range (offset relative to the range start)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset]

    @classmethod
    def from_json(cls, row: list) -> "TensorSpec":
        name, dtype, shape, offset = row
        nbytes = DTYPES[dtype].itemsize
        for d in shape:
            nbytes *= d
        return cls(name=name, dtype=dtype, shape=tuple(shape), offset=offset, nbytes=nbytes)


def plan_layout(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorSpec], int]:
    """Place each tensor after the range header, aligned; returns the specs and the range length."""
    specs, cursor = [], RANGE_HEADER_BYTES
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the feature store does not carry")
        nbytes = t.numel() * t.element_size()
        specs.append(TensorSpec(name=name, dtype=DTYPE_NAMES[t.dtype], shape=tuple(t.shape), offset=cursor, nbytes=nbytes))
        cursor = align_up(cursor + nbytes)
    return specs, cursor


def views_of(buffer: memoryview, base: int, specs: Iterable[TensorSpec]) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over `buffer`. Each view keeps its memoryview slice alive, and the slice keeps
    the mmap exported, so the mapping cannot be closed under a live tensor (it raises BufferError instead
    of leaving a dangling pointer)."""
    out = {}
    for s in specs:
        dtype = DTYPES[s.dtype]
        if s.nbytes == 0:  # frombuffer refuses empty buffers
            out[s.name] = torch.empty(s.shape, dtype=dtype)
            continue
        start = base + s.offset
        out[s.name] = torch.frombuffer(buffer[start : start + s.nbytes], dtype=dtype).view(s.shape)
    return out


class RangeAllocator:
    """Ranges of [base, base + capacity), aligned, next-fit with wrap-around, out-of-order frees."""

    def __init__(self, capacity: int, *, base: int = 0):
        if capacity <= 0 or capacity % ALIGN:
            raise ValueError(f"capacity must be a positive multiple of {ALIGN}, got {capacity}")
        self.base, self.capacity = base, capacity
        self._starts: list[int] = []  # sorted
        self._ends: dict[int, int] = {}  # start -> end
        self._cursor = base

    @property
    def used_bytes(self) -> int:
        return sum(end - start for start, end in self._ends.items())

    def spans(self) -> list[tuple[int, int]]:
        return [(s, self._ends[s]) for s in self._starts]

    def reset(self, used: Iterable[tuple[int, int]]) -> None:
        """Replace the used set with (offset, length) pairs; the cursor stays where it was."""
        self._starts, self._ends = [], {}
        for offset, length in set(used):
            self._insert(offset, offset + length)

    def allocate(self, length: int) -> int | None:
        """The offset of a free aligned range of `length` bytes, or None when none is free now."""
        length = align_up(max(length, 1))
        if length > self.capacity:
            return None
        end_of_region = self.base + self.capacity
        for lo, hi in self._gaps():
            if lo >= self._cursor and hi - lo >= length:
                return self._take(lo, length)
            if lo < self._cursor < hi and hi - self._cursor >= length:
                return self._take(self._cursor, length)
        for lo, hi in self._gaps():  # wrap around
            if hi - lo >= length and lo + length <= end_of_region:
                return self._take(lo, length)
        return None

    def free(self, offset: int) -> None:
        del self._ends[offset]  # KeyError: not allocated, a caller bug
        self._starts.remove(offset)

    def _gaps(self):
        lo = self.base
        for start in self._starts:
            if start > lo:
                yield lo, start
            lo = max(lo, self._ends[start])
        if lo < self.base + self.capacity:
            yield lo, self.base + self.capacity

    def _take(self, offset: int, length: int) -> int:
        self._insert(offset, offset + length)
        self._cursor = offset + length
        if self._cursor >= self.base + self.capacity:
            self._cursor = self.base
        return offset

    def _insert(self, start: int, end: int) -> None:
        if start < self.base or end > self.base + self.capacity:
            raise ValueError(f"range [{start}, {end}) is outside the arena [{self.base}, {self.base + self.capacity})")
        bisect.insort(self._starts, start)
        self._ends[start] = end


WAIT_REPORT_S = 0.5  # on_wait is called about this often while a producer waits for space
MAX_POLL_S = 0.05


def wait_for(attempt: Callable[[], T | None], on_wait: Callable[[float], None] | None) -> T:
    """Backpressure: retry `attempt` (which re-reads the database) until it returns a value, calling
    on_wait(seconds waited) every WAIT_REPORT_S; on_wait may raise to abort the wait."""
    start = last_report = time.monotonic()
    poll = 0.002
    while (result := attempt()) is None:
        now = time.monotonic()
        if on_wait is not None and now - last_report >= WAIT_REPORT_S:
            on_wait(now - start)
            last_report = now
        time.sleep(poll)
        poll = min(poll * 2, MAX_POLL_S)
    return result
