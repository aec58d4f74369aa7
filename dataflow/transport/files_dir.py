"""The files store's directory: naming, the writer lock and disk use. No torch, so gc and `dataflow status`
stay fast."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from dataflow.errors import StoreError
from dataflow.transport.segment import LOCK_WAIT_S

LOCK_FILE = ".writer.lock"
SUFFIX = ".safetensors"
STORE_META_PREFIX = "files_store."  # RunMeta key per files store -> its directory (gc finds it there)


def store_id(run_id: str, producer_id: str) -> str:
    return f"files-{run_id[:12]}-{producer_id}"


def disk_usage(directory: Path) -> tuple[int, int]:
    """(bytes, files) of the sample files in a store directory."""
    sizes = [p.stat().st_size for p in directory.glob(f"*{SUFFIX}")] if directory.is_dir() else []
    return sum(sizes), len(sizes)


def lock_writer(directory: Path, owner: str) -> int | None:
    """An fd holding the directory's writer lock; None when a live writer holds it (owner=None: gc asks)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + (LOCK_WAIT_S if owner else 0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                if owner is None:
                    return None
                raise StoreError(
                    f"{directory}: another producer is writing this files store; give each rollout its own "
                    f"--producer-id (this one is {owner!r})"
                ) from None
            time.sleep(0.05)
