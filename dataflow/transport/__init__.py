"""The data plane: tensors move through shared memory (or files); only small JSON handles go through SQLite.

    writer = open_writer(conn, store="shm", producer_id="rollout-0", max_inflight_bytes=4 << 30)
    handle, nbytes = writer.write(key, tensors, on_wait=...)   # then commit RefItem(key, handle, nbytes, handle["store"])
    reader = open_reader(conn)
    tensors = reader.open(handle)   # zero-copy views; FeaturesLost if the bytes are gone or were reused
    reader.check(handle)            # optional re-check after reading the views; the ack frees the bytes

torch is imported only by open_writer / open_reader, so `sweep` and `usage` keep `dataflow status` fast.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from dataflow.control.meta import RunMeta
from dataflow.errors import InputError
from dataflow.transport.files_dir import store_id
from dataflow.transport.gc import SweepReport, sweep, usage
from dataflow.transport.segment import SHM_DIR

if TYPE_CHECKING:
    from dataflow.transport.files import FilesWriter
    from dataflow.transport.reader import Reader
    from dataflow.transport.shm import ShmWriter

STORES = ("shm", "files")

__all__ = ["open_writer", "open_reader", "sweep", "usage", "SweepReport"]


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
    from dataflow.transport.files import FilesWriter
    from dataflow.transport.shm import ShmWriter, arena_name

    if max_inflight_bytes <= 0:
        raise InputError(f"--max-inflight-bytes must be positive, got {max_inflight_bytes}")
    if store not in STORES:
        raise InputError(f"--store {store!r}: pick one of {', '.join(STORES)}")
    if store == "files" and store_dir is None:
        raise InputError("--store files needs --store-dir DIR (where the sample files go)")
    run_id = RunMeta(conn).run_id
    name = arena_name(run_id, producer_id)  # also checks the producer id
    if store == "shm":
        writer = ShmWriter(conn, name=name, capacity=max_inflight_bytes, shm_dir=shm_dir)
    else:
        writer = FilesWriter(
            conn,
            store=store_id(run_id, producer_id),
            store_dir=Path(store_dir),
            max_inflight_bytes=max_inflight_bytes,
            max_disk_bytes=max_disk_bytes,
        )
    if max_sample_bytes is not None:
        try:
            writer.check_fits(max_sample_bytes, "the largest sample (max length)")
        except BaseException:
            writer.close()
            raise
    return writer


def open_reader(conn: sqlite3.Connection | None, *, shm_dir: Path = SHM_DIR) -> Reader:
    """The consumer's reader. The run database says which stores are the run's own (and where); without
    one (Ray mode, off the ledger's node) only Ray-store handles are readable."""
    from dataflow.transport.reader import Reader

    return Reader(conn, shm_dir)
