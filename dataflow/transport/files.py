"""The files feature store: one safetensors file per sample, mapped (not read) by the consumer.

For spill and offline use. Files survive an ack, so a trainer can run several epochs over them without
re-running the target (`retained` is true). In-flight bytes (live refs) are bounded by the same
watermark as the arena; total disk use can be capped with max_disk_bytes and is reported by `usage`.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import sqlite3
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.errors import FULL_DISK, FeaturesLost, StoreError
from dataflow.transport.arena import DTYPE_NAMES, DTYPES, TensorSpec, align_up, views_of, wait_for
from dataflow.transport.files_dir import (
    STORE_META_PREFIX,
    SUFFIX,
    disk_usage,
    lock_writer,
    read_owner,
    recorded_stores,
    sample_path,
    stamp_owner,
)
from dataflow.transport.owner import Owner, owner_of
from dataflow.transport.refs import Uncommitted
from dataflow.transport.segment import human
from dataflow.transport.shm import foreign_store

class FilesWriter:
    kind = "files"

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        store: str,
        store_dir: Path,
        max_inflight_bytes: int,
        max_disk_bytes: int | None = None,
    ):
        self.conn, self.store = conn, store
        self.capacity, self.max_disk_bytes = max_inflight_bytes, max_disk_bytes
        self.directory = (store_dir / store).resolve()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = lock_writer(self.directory, store)
        try:
            self._check_owner(owner_of(conn))
        except BaseException:
            self.close()
            raise
        RunMeta(conn).set(STORE_META_PREFIX + store, str(self.directory))
        self._uncommitted = Uncommitted()
        self._disk_bytes = disk_usage(self.directory)[0]

    @property
    def used_bytes(self) -> int:
        return self._inflight_bytes()

    def _check_owner(self, owner: Owner) -> None:
        """A fresh directory becomes ours; one stamped by another database (a copy, another run) is refused."""
        found = read_owner(self.directory)
        if found is None:  # fresh (or made before stores were stamped)
            stamp_owner(self.directory, owner)
        elif not owner.same_database(found):
            raise StoreError(foreign_store(self.directory, found, owner))

    def check_fits(self, nbytes: int, what: str = "a sample") -> None:
        if nbytes > self.capacity:
            raise StoreError(
                f"{what} needs {human(nbytes)} but --max-inflight-bytes is {human(self.capacity)}; "
                f"pass at least {nbytes * 2} (room for two samples)"
            )

    def write(
        self, key: str, tensors: dict[str, torch.Tensor], on_wait: Callable[[float], None] | None = None
    ) -> tuple[dict, int]:
        estimate = file_size(key, tensors)
        self.check_fits(estimate, f"sample {key!r}")
        self._check_disk(estimate)
        wait_for(lambda: True if self._inflight_bytes() + estimate <= self.capacity else None, on_wait)
        gen = secrets.randbits(62)
        path = self.directory / f"{gen:016x}{SUFFIX}"
        partial = path.with_suffix(".partial")
        try:
            save_file({k: t.contiguous() for k, t in tensors.items()}, partial, metadata={"key": key})
        except (OSError, SafetensorError) as e:
            partial.unlink(missing_ok=True)
            if not is_disk_full(e):
                raise
            raise StoreError(
                f"{self.directory}: the disk is full ({e}); free space there, or cap the store with "
                "--max-disk-bytes, then restart the rollout (the run resumes)"
            ) from None
        os.replace(partial, path)  # a reader never sees half a file
        size = path.stat().st_size
        self._disk_bytes += size
        handle = {"kind": self.kind, "store": self.store, "key": key, "gen": gen, "name": path.name, "nbytes": size}
        self._uncommitted.add(handle)
        return handle, size

    def abandon(self, handle: dict) -> None:
        if self._uncommitted.discard(handle):
            sample_path(self.directory, handle).unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _inflight_bytes(self) -> int:
        uncommitted = sum(h["nbytes"] for h in self._uncommitted.resolve(self.conn))  # before live: see shm.py
        return uncommitted + RefQueue(self.conn).live_bytes(self.store)

    def _check_disk(self, nbytes: int) -> None:
        if self.max_disk_bytes is None or self._disk_bytes + nbytes <= self.max_disk_bytes:
            return
        self._disk_bytes = disk_usage(self.directory)[0]  # gc may have removed files meanwhile
        if self._disk_bytes + nbytes > self.max_disk_bytes:
            raise StoreError(
                f"{self.directory}: the files store holds {human(self._disk_bytes)} and --max-disk-bytes is "
                f"{human(self.max_disk_bytes)}; raise it, free space with `dataflow gc`, or use --store shm"
            )


def is_disk_full(error: Exception) -> bool:
    """ENOSPC/EDQUOT, whether raised by Python or reported by safetensors' Rust writer ("os error 28")."""
    if isinstance(error, OSError):
        return error.errno in FULL_DISK
    return any(f"(os error {code})" in str(error) for code in FULL_DISK)


def file_size(key: str, tensors: dict[str, torch.Tensor]) -> int:
    """The size safetensors will write (its JSON header is compact and padded to 8 bytes), at most 8 over."""
    header, offset = {"__metadata__": {"key": key}}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return 8 + align_up(len(json.dumps(header, separators=(",", ":"))), 8) + offset


class FilesReader:
    """Opens sample files of the run's own files stores only (see files_dir): the run database says which
    directories those are, and a handle may name nothing but a sample file inside one."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self._stores: dict[str, Path] = {}  # checked: named as ours, stamped with our owner

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        path = self._path(handle)
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: views are writable
        except (FileNotFoundError, ValueError):
            raise FeaturesLost(f"sample {handle['key']!r}: its features file {path} is gone or empty") from None
        buf = memoryview(mm)
        try:
            base, specs, key = _parse_header(buf)
        except (ValueError, KeyError, struct.error):
            raise FeaturesLost(f"sample {handle['key']!r}: {path} is not a readable safetensors file") from None
        if key != handle["key"]:
            raise FeaturesLost(f"sample {handle['key']!r}: {path} holds sample {key!r} instead")
        return views_of(buf, base, specs)

    def retained(self, handle: dict) -> bool:
        try:
            return self._path(handle).is_file()
        except FeaturesLost:
            return False

    def _path(self, handle: dict) -> Path:
        store = handle.get("store")
        if store not in self._stores:  # a store the rollout opened since we last looked
            self._add_store(store)
        return sample_path(self._stores[store], handle)

    def _add_store(self, store) -> None:
        directory = recorded_stores(self.conn, RunMeta(self.conn).run_id)[0].get(store)
        if directory is None:
            raise FeaturesLost(f"files store {store!r} is not one of this run's stores")
        owner, found = owner_of(self.conn), read_owner(directory)
        if not owner.same_database(found):
            raise StoreError(foreign_store(directory, found, owner))
        self._stores[store] = directory


def _parse_header(buf: memoryview) -> tuple[int, list[TensorSpec], str | None]:
    """safetensors: u64 header length, JSON header, then the data (offsets relative to its start)."""
    (n,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(bytes(buf[8 : 8 + n]))
    key = header.pop("__metadata__", {}).get("key")
    specs = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"dtype {entry['dtype']}")
        specs.append(TensorSpec(name=name, dtype=entry["dtype"], shape=tuple(entry["shape"]), offset=begin, nbytes=end - begin))
    return 8 + n, specs, key
