"""One trainer group per run (docs/architecture.md, invariant 9): each rank holds an exclusive flock beside the database.

The kernel drops a flock when its holder dies (kill -9 included), so the lock is never stale and a slow but
live trainer (one long step, a stale heartbeat) is still refused. The holder writes its pid and host into the
lock file so the refused process can name it. torchrun ranks lock their own rank's file, so a group runs
side by side with itself, while any second trainer on the run, of any world size, is refused at rank 0.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from dataflow.errors import InputError


def lock_path(db: Path, rank: int) -> Path:
    db = Path(db).resolve()  # one lock however the database path was spelled
    return db.with_name(f"{db.name}.train-{rank}.lock")


def _stamp_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def hold_trainer_lock(db: Path, rank: int) -> tuple[FileLock | None, str]:
    """Take this rank's lock without waiting: (lock, "") or (None, one line naming the holder)."""
    path = lock_path(db, rank)
    lock = FileLock(path, timeout=0, mode=0o600, fallback_to_soft=False, on_acquired=_stamp_holder)
    try:
        lock.acquire()
    except Timeout:
        return None, (
            f"{db}: trainer rank {rank} of this run is already running ({_holder(path)}); "
            "stop it first, or train another run with another --db"
        )
    return lock, ""


def refuse_unless_all_locked(refusal: str, all_locked: bool) -> None:
    """After the ranks compared notes: every rank stops if any was refused (no rank trains half a group)."""
    if refusal:
        raise InputError(refusal)
    if not all_locked:
        raise InputError("another rank of this trainer group was refused: a trainer already runs on this --db")
