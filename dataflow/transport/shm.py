"""The CPU shared-memory feature store: one pre-mapped arena per producer, byte ranges per sample.

Each range starts with a small header (magic, generation, length); the handle carries the same
generation, so a handle whose bytes were reused is refused instead of read as garbage. The writer's
allocator is re-derived from the live refs in SQLite (no second source of truth), which is how frees
made by the trainer arrive and how a restarted producer picks up where it was.
"""

from __future__ import annotations

import re
import sqlite3
import struct
from pathlib import Path
from typing import Callable

import torch

from dataflow.errors import FeaturesLost, InputError, StoreError
from dataflow.transport.arena import RangeAllocator, TensorSpec, align_up, plan_layout, views_of, wait_for
from dataflow.transport.owner import RUN_ID_CHARS, Owner, owner_of, store_name
from dataflow.transport.refs import Uncommitted, live_handles
from dataflow.transport.segment import HEADER_BYTES, SHM_DIR, Segment, human

RANGE_HEADER = struct.Struct("<8sQQ")  # magic, generation, length
RANGE_MAGIC = b"DFRANGE1"
PRODUCER_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ARENA_NAME_RE = re.compile(rf"^dataflow-[0-9a-f]{{{RUN_ID_CHARS}}}-[A-Za-z0-9_.-]{{1,64}}$")  # never a path


def arena_name(run_id: str, producer_id: str) -> str:
    if not PRODUCER_ID_RE.match(producer_id):
        raise InputError(f"producer id {producer_id!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return store_name("dataflow", run_id, producer_id)


class ShmWriter:
    """The producer side. `write` blocks while the arena is full (backpressure), never drops."""

    kind = "shm"

    def __init__(self, conn: sqlite3.Connection, *, name: str, capacity: int, shm_dir: Path = SHM_DIR):
        self.conn, self.store = conn, name
        self.capacity = align_up(capacity)
        self.path = shm_dir / name
        self.owner = owner_of(conn)
        self._uncommitted = Uncommitted()
        self._segment = self._open_segment()
        self._alloc = RangeAllocator(self.capacity, base=HEADER_BYTES)
        self._rebuild()

    @property
    def used_bytes(self) -> int:
        """Bytes held as of the last look at the database (live refs + uncommitted writes)."""
        return self._alloc.used_bytes

    def check_fits(self, nbytes: int, what: str = "a sample") -> None:
        if nbytes > self.capacity:
            raise StoreError(
                f"{what} needs {human(nbytes)} but the feature arena {self.path} holds {human(self.capacity)}; "
                f"pass --max-inflight-bytes of at least {align_up(nbytes * 2)} (room for two samples)"
            )

    def write(
        self, key: str, tensors: dict[str, torch.Tensor], on_wait: Callable[[float], None] | None = None
    ) -> tuple[dict, int]:
        specs, length = plan_layout(tensors)
        self.check_fits(length, f"sample {key!r}")
        offset = self._alloc.allocate(length)
        if offset is None:
            offset = self._wait_for_space(length, on_wait)
        self._segment.reserve(offset, length)
        gen = self._segment.next_generation()
        buf = self._segment.buf
        # The header goes first: from here on any older handle to these bytes is refused.
        RANGE_HEADER.pack_into(buf, offset, RANGE_MAGIC, gen, length)
        for name, dst in views_of(buf, offset, specs).items():
            dst.copy_(tensors[name])
        handle = {
            "kind": self.kind,
            "store": self.store,
            "key": key,
            "nonce": self._segment.nonce,
            "gen": gen,
            "offset": offset,
            "nbytes": length,
            "tensors": [s.to_json() for s in specs],
        }
        self._uncommitted.add(handle)
        return handle, length

    def abandon(self, handle: dict) -> None:
        """The producer will not commit this write (e.g. its task lease was lost): free its range now."""
        if self._uncommitted.discard(handle):
            self._rebuild()

    def close(self) -> None:
        """Unmap; when no live ref points into the arena any more also remove the segment (a PENDING or
        LEASED ref's bytes stay, whatever else the run says). Writes not committed by now never will be:
        the producer commits right after `write`."""
        if self._segment is None:
            return
        self._uncommitted.clear()
        if not self._used_ranges() and self._segment.still_named():
            self.path.unlink(missing_ok=True)
        self._segment.close()
        self._segment = None

    def _wait_for_space(self, length: int, on_wait: Callable[[float], None] | None) -> int:
        def attempt() -> int | None:
            self._rebuild()  # frees made by the trainer arrive through the database
            return self._alloc.allocate(length)

        return wait_for(attempt, on_wait)

    def _used_ranges(self) -> set[tuple[int, int]]:
        # Uncommitted first: a write committed between the two reads then shows up as live.
        used = {(h["offset"], h["nbytes"]) for h in self._uncommitted.resolve(self.conn)}
        nonce = self._segment.nonce
        used |= {(h["offset"], h["nbytes"]) for h in live_handles(self.conn, self.store) if h.get("nonce") == nonce}
        return used

    def _rebuild(self) -> None:
        self._alloc.reset(self._used_ranges())

    def _open_segment(self) -> Segment:
        """Re-attach this producer's segment (its pending refs stay readable) or create it."""
        for _ in range(5):
            segment = self._attach_or_create()
            try:
                segment.lock(self.store)
            except BaseException:
                segment.close()
                raise
            if not segment.still_named():  # gc removed it while we were locking
                segment.close()
                continue
            if not self.owner.same_database(segment.owner):
                segment.close()
                raise StoreError(foreign_store(self.path, segment.owner, self.owner))
            if segment.capacity == self.capacity:
                return segment
            self._drop_resized(segment)
        raise StoreError(f"{self.path}: could not open the feature arena (it keeps being replaced); run `dataflow gc`")

    def _attach_or_create(self) -> Segment:
        if self.path.exists():
            try:
                return Segment.attach(self.path)
            except FeaturesLost:  # vanished, or a half-created segment of a producer killed in create
                self.path.unlink(missing_ok=True)
        try:
            return Segment.create(self.path, self.capacity, self.owner)
        except FileExistsError:
            return Segment.attach(self.path)

    def _drop_resized(self, segment: Segment) -> None:
        """--max-inflight-bytes changed: recreate the arena, unless it still holds live samples."""
        live = [h for h in live_handles(self.conn, self.store) if h.get("nonce") == segment.nonce]
        if live:
            segment.close()
            raise StoreError(
                f"{self.path}: holds {len(live)} unconsumed samples in an arena of {human(segment.capacity)}, "
                f"but --max-inflight-bytes asks for {human(self.capacity)}; use the original size until the "
                "trainer has drained them"
            )
        self.path.unlink(missing_ok=True)
        segment.close()


def foreign_store(where: Path, found: Owner | None, ours: Owner) -> str:
    whose = found.describe() if found is not None else "no recorded run (an older dataflow's)"
    copy = " (a copy of this database?)" if found is not None and found.run_id == ours.run_id else ""
    return (
        f"{where}: this feature store belongs to {whose}{copy}, not to {ours.describe()}; two databases "
        "cannot share a store: start this run with a fresh --db, or remove the store with "
        "`dataflow gc --all-orphans` if its run is abandoned"
    )


class ShmReader:
    """The consumer side: each arena is mapped once and stays mapped for the reader's life. With an owner,
    an arena of another database (a copied run) is refused instead of trained from."""

    def __init__(self, shm_dir: Path = SHM_DIR, owner: Owner | None = None):
        self.shm_dir, self.owner = shm_dir, owner
        self._segments: dict[str, Segment] = {}

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        segment = self._segment_for(handle)
        self._check_range(segment, handle)
        return views_of(segment.buf, handle["offset"], [TensorSpec.from_json(t) for t in handle["tensors"]])

    def check(self, handle: dict) -> None:
        """Re-check after reading views: FeaturesLost if the bytes were reused meanwhile."""
        self._check_range(self._segment_for(handle), handle)

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()  # stays mapped while views of it live
        self._segments.clear()

    def _segment_for(self, handle: dict) -> Segment:
        name = handle["store"]
        if not ARENA_NAME_RE.match(name):
            raise FeaturesLost(f"handle names arena {name!r}, which is not an arena name")
        segment = self._segments.get(name)
        if segment is None or (segment.nonce != handle["nonce"] and not segment.still_named()):
            fresh = Segment.attach(self.shm_dir / name)
            if self.owner is not None and not self.owner.same_database(fresh.owner):
                fresh.close()
                raise StoreError(foreign_store(fresh.path, fresh.owner, self.owner))
            if segment is not None:
                segment.close()
            self._segments[name] = segment = fresh
        if segment.nonce != handle["nonce"]:
            raise FeaturesLost(
                f"sample {handle['key']!r}: arena {name} was re-created since it was written; "
                "the features are gone and the prompt must be regenerated"
            )
        return segment

    def _check_range(self, segment: Segment, handle: dict) -> None:
        offset, length = handle["offset"], handle["nbytes"]
        if offset < HEADER_BYTES or offset + length > HEADER_BYTES + segment.capacity:
            raise FeaturesLost(f"sample {handle['key']!r}: range [{offset}, +{length}) is outside arena {segment.path}")
        magic, gen, stored_length = RANGE_HEADER.unpack_from(segment.buf, offset)
        if magic != RANGE_MAGIC or gen != handle["gen"] or stored_length != length:
            raise FeaturesLost(
                f"sample {handle['key']!r}: its bytes in arena {handle['store']} were reused "
                f"(generation {gen}, handle has {handle['gen']}); the prompt must be regenerated"
            )
