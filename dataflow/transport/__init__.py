"""The data plane: tensors move through shared memory (or files); only small JSON handles go through SQLite.

    writer = open_writer(conn, store="shm", producer_id="rollout-0", max_inflight_bytes=4 << 30)
    handle, nbytes = writer.write(key, tensors, on_wait=...)   # then commit RefItem(key, handle, nbytes, handle["store"])
    reader = open_reader(conn)
    tensors = reader.open(handle)   # zero-copy views; FeaturesLost if the bytes are gone or were reused
    reader.check(handle)            # optional re-check after reading the views
    reader.release(handle)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from dataflow.control.meta import RunMeta
from dataflow.errors import FeaturesLost, InputError
from dataflow.transport.files import FilesReader, FilesWriter, store_id
from dataflow.transport.gc import SweepReport, sweep, usage
from dataflow.transport.shm import ShmReader, ShmWriter, arena_name
from dataflow.transport.segment import SHM_DIR

STORES = ("shm", "files")

__all__ = ["open_writer", "open_reader", "Reader", "ShmWriter", "FilesWriter", "sweep", "usage", "SweepReport"]


def open_writer(
    conn: sqlite3.Connection,
    store: str,
    producer_id: str,
    max_inflight_bytes: int,
    store_dir: Path | None = None,
    *,
    max_disk_bytes: int | None = None,
    max_sample_bytes: int | None = None,
    shm_dir: Path = SHM_DIR,
) -> ShmWriter | FilesWriter:
    """The producer's feature store. max_sample_bytes (the largest sample the producer can make, e.g.
    from max_length) turns "a sample larger than the arena" into an error at start instead of mid-run."""
    if max_inflight_bytes <= 0:
        raise InputError(f"--max-inflight-bytes must be positive, got {max_inflight_bytes}")
    run_id = RunMeta(conn).run_id
    if store == "shm":
        writer = ShmWriter(conn, name=arena_name(run_id, producer_id), capacity=max_inflight_bytes, shm_dir=shm_dir)
    elif store == "files":
        if store_dir is None:
            raise InputError("--store files needs --store-dir DIR (where the sample files go)")
        arena_name(run_id, producer_id)  # same producer-id rules for both stores
        writer = FilesWriter(
            conn,
            store=store_id(run_id, producer_id),
            store_dir=Path(store_dir),
            max_inflight_bytes=max_inflight_bytes,
            max_disk_bytes=max_disk_bytes,
        )
    else:
        raise InputError(f"--store {store!r}: pick one of {', '.join(STORES)}")
    if max_sample_bytes is not None:
        try:
            writer.check_fits(max_sample_bytes, "the largest sample (max length)")
        except BaseException:
            writer.close()
            raise
    return writer


class Reader:
    """The consumer's view of every store of the run; arenas are mapped once, on first use."""

    def __init__(self, shm_dir: Path = SHM_DIR):
        self._shm = ShmReader(shm_dir)
        self._files = FilesReader()

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        return self._store(handle).open(handle)

    def check(self, handle: dict) -> None:
        """FeaturesLost if the bytes behind an opened handle were reused since (shm; files never are)."""
        if handle.get("kind") == "shm":
            self._shm.check(handle)

    def release(self, handle: dict) -> None:
        """Done with this handle's views. The memory itself is freed by the ack (the ref's state in the
        database); views the caller still holds stay valid memory, but may be overwritten after the ack."""

    def retained(self, handle: dict) -> bool:
        """Whether the features outlive an ack (files do, arena ranges do not)."""
        return handle.get("kind") == "files" and self._files.retained(handle)

    def close(self) -> None:
        self._shm.close()

    def _store(self, handle: dict) -> ShmReader | FilesReader:
        kind = handle.get("kind")
        if kind == "shm":
            return self._shm
        if kind == "files":
            return self._files
        raise FeaturesLost(f"handle of sample {handle.get('key')!r} names unknown store kind {kind!r}")


def open_reader(conn: sqlite3.Connection | None = None, *, shm_dir: Path = SHM_DIR) -> Reader:
    """The consumer's reader. conn is accepted for symmetry with open_writer; reading needs no database."""
    return Reader(shm_dir)
