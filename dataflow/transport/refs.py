"""What the data plane reads from the run database. Read-only: the control plane owns every write.

A writer's used memory is the live refs of its store (PENDING/LEASED) plus its own writes whose ref is
not committed yet (the producer commits a ref after `write` returns). Those are tracked here until the
database shows what became of them.
"""

from __future__ import annotations

import sqlite3

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue, RefState


def same_write(a: dict, b: dict) -> bool:
    """Two handles name the same bytes (the generation is unique per store)."""
    return a["store"] == b["store"] and a["gen"] == b["gen"] and a.get("nonce") == b.get("nonce")


def live_handles(conn: sqlite3.Connection, store: str) -> list[dict]:
    return RefQueue(conn).live_handles(store)


def handles_by_state(conn: sqlite3.Connection, store: str) -> list[tuple[dict, RefState]]:
    return RefQueue(conn).handles_with_state(store)


class Uncommitted:
    """This writer's writes whose ref the database does not hold yet."""

    def __init__(self) -> None:
        self._handles: list[dict] = []

    def __len__(self) -> int:
        return len(self._handles)

    def add(self, handle: dict) -> None:
        self._handles.append(handle)

    def discard(self, handle: dict) -> bool:
        before = len(self._handles)
        self._handles = [h for h in self._handles if not same_write(h, handle)]
        return len(self._handles) < before

    def clear(self) -> None:
        self._handles = []

    def resolve(self, conn: sqlite3.Connection) -> list[dict]:
        """Drop the writes the database now decides about; return those still uncommitted.

        Committed (the key's row carries this handle): from now on its state in the DB says whether the
        bytes are in use. Superseded (the key's row carries another handle and is not LOST, so an
        idempotent put of ours can never land): free. Otherwise the commit may still come: keep."""
        if not self._handles:
            return []
        rows = RefQueue(conn).handles_by_key(sorted({h["key"] for h in self._handles}))
        keep = []
        for h in self._handles:
            row = rows.get(h["key"])
            if row is None:
                keep.append(h)
            elif row[1] == RefState.LOST and not same_write(row[0], h):  # (a compacted key has no handle: free)
                keep.append(h)
        self._handles = keep
        return list(keep)


def files_stores(conn: sqlite3.Connection, prefix: str) -> dict[str, str]:
    """The files stores this run has used: store id -> directory (recorded in meta by their writers)."""
    return RunMeta(conn).with_prefix(prefix)
