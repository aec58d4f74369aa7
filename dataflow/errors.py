"""The one error hierarchy. The CLI prints any DataflowError as one line and exits non-zero."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
from pathlib import Path

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class DataflowError(Exception):
    """A user-facing failure: the message says what, where, and what to do."""

    exit_code = 2


class DatabaseError(DataflowError):
    """The run database cannot be used (not ours, too new, network FS, unwritable)."""


class ConfigMismatch(DataflowError):
    """A process joined a run whose recorded config differs from its own."""


class InputError(DataflowError):
    """Bad user input: a missing file, a malformed row, an inconsistent option."""


class StoreError(DataflowError):
    """The data plane cannot serve a request (arena too small, /dev/shm too small, ...)."""


class FeaturesLost(StoreError):
    """A handle's bytes are gone or were reused (producer died, generation changed)."""


class Interrupted(DataflowError):
    """Stopped by a signal at a safe point: the run is resumable. Exits 128 + the signal's number."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; both processes stopped cleanly and the run "
                         "is resumable")


def sqlite_problem(db: Path | None, error: sqlite3.Error) -> str:
    """One line for an SQLite failure on the run database: what, where, what to do. A failed statement
    rolled back its transaction, so the run is as it was before it."""
    text, where = str(error), db or "the run database"
    if "malformed" in text or "not a database" in text:
        return (f"{where}: the database file is corrupt ({text}); restore it from a backup, or start a new run "
                "with another --db")
    if "readonly" in text or "unable to open" in text or "access permission" in text:
        files = [Path(f"{db}{suffix}") for suffix in ("", "-wal", "-shm")] if db else []
        blocked = [str(f) for f in files if f.exists() and not os.access(f, os.R_OK | os.W_OK)]
        return (f"{', '.join(blocked) or where}: not writable by this user ({text}); fix the permissions (SQLite "
                "writes the database and its -wal and -shm files even to read it) or run as their owner")
    if "full" in text or "disk I/O" in text:
        return (f"{where}: the disk under the database is full or failing ({text}); free space on "
                f"{Path(str(where)).parent} and rerun: the run resumes where it stopped")
    if "locked" in text or "busy" in text:
        return f"{where}: another process held the database lock too long ({text}); rerun when it is done"
    return f"{where}: SQLite failed ({text}); rerun with DATAFLOW_DEBUG=1 for the traceback"


def disk_full(error: OSError) -> str:
    where = error.filename or "a file of the run"
    return (f"{where}: no space left on the device ({error.strerror}); free space there and rerun: the run "
            "resumes where it stopped")
