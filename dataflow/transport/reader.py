"""The consumer's side of every store of a run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from dataflow.errors import FeaturesLost
from dataflow.transport.files import FilesReader
from dataflow.transport.owner import owner_of
from dataflow.transport.segment import SHM_DIR
from dataflow.transport.shm import ShmReader


class Reader:
    """Opens any handle of the run as zero-copy views; arenas are mapped once, on first use, and stay
    mapped for the reader's life. Only the run's own stores are read (a copied database is refused)."""

    def __init__(self, conn: sqlite3.Connection | None, shm_dir: Path = SHM_DIR):
        # No connection (Ray mode: the database is on the ledger's node): only Ray-store handles are readable.
        self._shm = ShmReader(shm_dir, owner_of(conn)) if conn is not None else None
        self._files = FilesReader(conn) if conn is not None else None
        self._ray = None  # RayReader, made on the first Ray handle (only Ray mode imports ray)

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        return self._store(handle).open(handle)

    def check(self, handle: dict) -> None:
        """FeaturesLost if the bytes behind an opened handle were reused since (shm; files never are)."""
        if handle.get("kind") == "shm" and self._shm is not None:
            self._shm.check(handle)

    def retained(self, handle: dict) -> bool:
        """Whether the features outlive an ack (files do, arena ranges do not)."""
        return handle.get("kind") == "files" and self._files.retained(handle)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()

    def _store(self, handle: dict):
        kind = handle.get("kind")
        local = {"shm": self._shm, "files": self._files}
        if kind in local:
            if local[kind] is None:
                raise FeaturesLost(f"sample {handle.get('key')!r} is in a {kind} store, unreadable off the database's node")
            return local[kind]
        if kind == "ray":
            if self._ray is None:
                from dataflow.transport.ray_store import RayReader

                self._ray = RayReader()
            return self._ray
        raise FeaturesLost(f"handle of sample {handle.get('key')!r} names unknown store kind {kind!r}")
