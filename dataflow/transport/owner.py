"""Whose feature store is this: the run id and the database file, stamped into every arena and files store.

Names carry only the first RUN_ID_CHARS hex digits of the run id (store_name builds every one), and a
copied database carries the same run id as its original, so neither a name nor the run id alone tells two
databases apart. The database file's (device, inode) does: it survives a rename or a moved run directory
and differs for a copy. Paths are kept only for messages and for proving that another run has finished (its
file is still where it was).
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

from dataflow.control.db import database_path

RUN_ID_CHARS = 12  # enough to tell runs apart in a name; the owner stamp holds the whole id
STORE_KINDS = ("dataflow", "files", "ray")  # a shared-memory arena (what /dev/shm lists), a files store, Ray objects


def store_name(kind: str, run_id: str, producer_id: str = "") -> str:
    """`<kind>-<run>-<producer>`: the name of one producer's feature store, or without a producer id the
    prefix every store of that kind in the run shares."""
    assert kind in STORE_KINDS, kind
    return f"{kind}-{run_id[:RUN_ID_CHARS]}-{producer_id}"


@dataclass(frozen=True)
class Owner:
    run_id: str
    db_file: str  # "device:inode" of the run database
    db_path: str  # where it was when the store was made; not part of the identity

    def same_database(self, other: Owner | None) -> bool:
        return other is not None and (self.run_id, self.db_file) == (other.run_id, other.db_file)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        """None for anything that is not an owner record (e.g. a store made by an older dataflow)."""
        try:
            fields = json.loads(text)
            return cls(run_id=str(fields["run_id"]), db_file=str(fields["db_file"]), db_path=str(fields["db_path"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"run {self.run_id[:RUN_ID_CHARS]} of {self.db_path}"


def file_identity(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def owner_of(conn: sqlite3.Connection) -> Owner:
    from dataflow.control.meta import RunMeta

    path = database_path(conn)
    return Owner(run_id=RunMeta(conn).run_id, db_file=file_identity(path), db_path=path)


def provably_finished(owner: Owner | None) -> bool:
    """Whether another run is finished for good, judged by its own database: still at its recorded path,
    the same file (inode) and run id, and marked finished. Anything less is no proof. That database is
    only read (opened read-only: never migrated, never locked for writing)."""
    from dataflow.control.meta import RunMeta

    if owner is None or not owner.db_path:
        return False
    try:
        if file_identity(owner.db_path) != owner.db_file:
            return False
        conn = sqlite3.connect(f"{Path(owner.db_path).as_uri()}?mode=ro", uri=True, timeout=1.0)
    except (OSError, sqlite3.Error):
        return False
    try:
        meta = RunMeta(conn)
        return meta.run_id == owner.run_id and meta.run_finished()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
