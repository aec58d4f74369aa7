"""The files store's directory: naming, ownership, the writer lock and disk use. No torch, so gc and
`dataflow status` stay fast.

A run records each files store's directory in its meta table, and handles name sample files. Both are
read back from the database, so neither is trusted as a path: a store directory must be named exactly
like one of this run's stores (`files-<run12>-<producer>`) and carry this run's owner record, and a
sample file is a bare `<16 hex>.safetensors` name inside it.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

from dataflow.errors import FULL_DISK, FeaturesLost, StoreError
from dataflow.transport.owner import Owner, store_name
from dataflow.transport.refs import files_stores
from dataflow.transport.segment import LOCK_WAIT_S, hold_lock

LOCK_FILE = ".writer.lock"
OWNER_FILE = ".owner"
SUFFIX = ".safetensors"
SAMPLE_FILE_RE = re.compile(r"^[0-9a-f]{16}\.safetensors$")
STORE_META_PREFIX = "files_store."  # RunMeta key per files store -> its directory (gc finds it there)


def store_id(run_id: str, producer_id: str) -> str:
    return store_name("files", run_id, producer_id)


def store_re(run_id: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(store_name('files', run_id))}[A-Za-z0-9_.-]{{1,64}}$")


def read_owner(directory: Path) -> Owner | None:
    try:
        return Owner.from_json((directory / OWNER_FILE).read_text())
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def stamp_owner(directory: Path, owner: Owner) -> None:
    """Record the store's owner once (a fresh directory), atomically."""
    partial = directory / f"{OWNER_FILE}.partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(owner.to_json())
        os.replace(partial, directory / OWNER_FILE)
    except OSError as e:
        partial.unlink(missing_ok=True)
        if e.errno not in FULL_DISK:
            raise
        raise StoreError(f"{directory}: no space left to create the files store ({e.strerror}); free space there "
                         "and rerun: the run resumes where it stopped") from None


def recorded_stores(conn: sqlite3.Connection, run_id: str) -> tuple[dict[str, Path], list[str]]:
    """This run's files stores (id -> directory) whose record is well-formed, and a note per record that
    is not (a directory named unlike its store or not of this run): those are never read nor cleaned."""
    stores, notes, valid = {}, [], store_re(run_id)
    for store, directory in files_stores(conn, STORE_META_PREFIX).items():
        path = Path(str(directory))
        if valid.match(store) and path.is_absolute() and path.name == store:
            stores[store] = path
        else:
            notes.append(f"ignored the files store record {store!r} -> {str(directory)!r}: not a store of this run")
    return stores, notes


def sample_name(handle: dict) -> str:
    """The file name a handle gives (handles of older runs carry a full path: only its name counts)."""
    return str(handle.get("name") or Path(str(handle.get("path", ""))).name)


def sample_path(directory: Path, handle: dict) -> Path:
    """The sample file a handle names, inside its store's directory and nowhere else."""
    name = sample_name(handle)
    if not SAMPLE_FILE_RE.match(name):
        raise FeaturesLost(f"sample {handle.get('key')!r}: its handle names file {name!r}, which is not a sample file")
    return directory / name


def disk_usage(directory: Path) -> tuple[int, int]:
    """(bytes, files) of the sample files in a store directory."""
    sizes = [p.stat().st_size for p in directory.glob(f"*{SUFFIX}")] if directory.is_dir() else []
    return sum(sizes), len(sizes)


def lock_writer(directory: Path, owner: str) -> int | None:
    """An fd holding the directory's writer lock; None when a live writer holds it (owner=None: gc asks)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    if hold_lock(fd, LOCK_WAIT_S if owner else 0.0):
        return fd
    os.close(fd)
    if owner is None:
        return None
    raise StoreError(
        f"{directory}: another producer is writing this files store; give each rollout its own "
        f"--producer-id (this one is {owner!r})"
    )
