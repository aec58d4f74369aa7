"""The run database: one WAL-mode SQLite file shared by every process of a run.

Connections are autocommit (`isolation_level=None`); every write goes through `immediate()`, which takes
the write lock up front (a deferred read that later upgrades to a write fails with SQLITE_BUSY at once,
whatever busy_timeout says).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dataflow.errors import DatabaseError, sqlite_problem

APPLICATION_ID = 0x64666C77  # "dflw": marks a file as a dataflow database
BUSY_TIMEOUT_MS = 30_000
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
WAL_BOUND_BYTES = 16 * 1024 * 1024  # past this, the writer that commits checkpoints the whole WAL and truncates it
WAL_TRUNCATE_WAIT_MS = 100  # how long that checkpoint waits for readers (it holds writers off meanwhile)
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "afs", "lustre", "gpfs", "ceph"}

SHARDS = 256  # a ref's shard is crc32(key) % SHARDS; rank r of n prefers the shards s with s % n == r

# Forward-only migrations: MIGRATIONS[i] takes a database from user_version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL              -- JSON
    ) WITHOUT ROWID;

    CREATE TABLE tasks (
        id             INTEGER PRIMARY KEY,
        key            TEXT NOT NULL UNIQUE,
        payload        TEXT NOT NULL,    -- JSON
        state          INTEGER NOT NULL DEFAULT 0,
        attempts       INTEGER NOT NULL DEFAULT 0,
        lease_token    TEXT,
        lease_owner    TEXT,
        lease_deadline REAL,
        last_error     TEXT,
        created_at     REAL NOT NULL,
        done_at        REAL
    );
    CREATE INDEX tasks_claim ON tasks(state, id);
    CREATE INDEX tasks_expiry ON tasks(state, lease_deadline);
    CREATE UNIQUE INDEX tasks_token ON tasks(lease_token) WHERE lease_token IS NOT NULL;

    CREATE TABLE refs (
        id             INTEGER PRIMARY KEY,
        key            TEXT NOT NULL UNIQUE,
        shard          INTEGER NOT NULL, -- crc32(key): rank r of n prefers shard % n == r
        state          INTEGER NOT NULL DEFAULT 0,
        store          TEXT NOT NULL,    -- arena name or files-store id
        handle         TEXT NOT NULL,    -- JSON, never tensor bytes
        nbytes         INTEGER NOT NULL,
        task_id        INTEGER REFERENCES tasks(id),
        attempts       INTEGER NOT NULL DEFAULT 0,
        lease_token    TEXT,
        lease_owner    TEXT,
        lease_deadline REAL,
        last_error     TEXT,
        created_at     REAL NOT NULL,
        acked_at       REAL,
        checkpoint_id  INTEGER
    );
    CREATE INDEX refs_claim ON refs(state, id);
    CREATE INDEX refs_expiry ON refs(state, lease_deadline);
    CREATE INDEX refs_store ON refs(store, state);
    CREATE UNIQUE INDEX refs_token ON refs(lease_token) WHERE lease_token IS NOT NULL;

    CREATE TABLE processes (
        id           TEXT PRIMARY KEY,
        role         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        host         TEXT NOT NULL,
        started_at   REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        status       TEXT NOT NULL,
        info         TEXT NOT NULL       -- JSON
    ) WITHOUT ROWID;

    CREATE TABLE checkpoints (
        id         INTEGER PRIMARY KEY,
        step       INTEGER NOT NULL,
        path       TEXT NOT NULL,
        created_at REAL NOT NULL,
        num_refs   INTEGER NOT NULL
    );
    """,
    # 2: `dataflow status` rates read recent rows by time; without these it scans every ref per refresh.
    """
    CREATE INDEX refs_created ON refs(created_at);
    CREATE INDEX refs_acked ON refs(acked_at);
    """,
    # 3: flat cost at a million refs. A ref's shard becomes one of SHARDS buckets, each a range of an index
    # of the PENDING refs by (shard, id), so a partitioned lease seeks its own buckets instead of walking every
    # pending row (partial: an ack or a trained ref never touches it). Counts and live bytes per state and per store are kept by triggers, in the same transaction as
    # every change of a row, so counts(), status and the writers' backpressure read a few rows, not scan.
    f"""
    UPDATE refs SET shard = shard % {SHARDS};
    CREATE INDEX refs_shard_claim ON refs(shard, id) WHERE state = 0;

    CREATE TABLE counts (
        tbl   TEXT NOT NULL,
        state INTEGER NOT NULL,
        rows  INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (tbl, state)
    ) WITHOUT ROWID;
    CREATE TABLE store_bytes (
        store TEXT PRIMARY KEY,
        live  INTEGER NOT NULL           -- nbytes of its PENDING and LEASED refs
    ) WITHOUT ROWID;
    INSERT INTO counts SELECT 'refs', state, count(*), sum(nbytes) FROM refs GROUP BY state;
    INSERT INTO counts SELECT 'tasks', state, count(*), 0 FROM tasks GROUP BY state;
    INSERT INTO store_bytes SELECT store, sum(nbytes) FROM refs WHERE state IN (0, 1) GROUP BY store;

    CREATE TRIGGER refs_count_insert AFTER INSERT ON refs BEGIN
        INSERT INTO counts VALUES ('refs', NEW.state, 1, NEW.nbytes)
            ON CONFLICT DO UPDATE SET rows = rows + 1, bytes = bytes + excluded.bytes;
        INSERT INTO store_bytes SELECT NEW.store, NEW.nbytes WHERE NEW.state IN (0, 1)
            ON CONFLICT DO UPDATE SET live = live + excluded.live;
    END;
    CREATE TRIGGER refs_count_update AFTER UPDATE OF state, nbytes, store ON refs
    WHEN OLD.state != NEW.state OR OLD.nbytes != NEW.nbytes OR OLD.store != NEW.store BEGIN
        UPDATE counts SET rows = rows - 1, bytes = bytes - OLD.nbytes WHERE tbl = 'refs' AND state = OLD.state;
        INSERT INTO counts VALUES ('refs', NEW.state, 1, NEW.nbytes)
            ON CONFLICT DO UPDATE SET rows = rows + 1, bytes = bytes + excluded.bytes;
        UPDATE store_bytes SET live = live - OLD.nbytes WHERE store = OLD.store AND OLD.state IN (0, 1);
        INSERT INTO store_bytes SELECT NEW.store, NEW.nbytes WHERE NEW.state IN (0, 1)
            ON CONFLICT DO UPDATE SET live = live + excluded.live;
    END;
    CREATE TRIGGER refs_count_delete AFTER DELETE ON refs BEGIN
        UPDATE counts SET rows = rows - 1, bytes = bytes - OLD.nbytes WHERE tbl = 'refs' AND state = OLD.state;
        UPDATE store_bytes SET live = live - OLD.nbytes WHERE store = OLD.store AND OLD.state IN (0, 1);
    END;
    CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks BEGIN
        INSERT INTO counts VALUES ('tasks', NEW.state, 1, 0) ON CONFLICT DO UPDATE SET rows = rows + 1;
    END;
    CREATE TRIGGER tasks_count_update AFTER UPDATE OF state ON tasks WHEN OLD.state != NEW.state BEGIN
        UPDATE counts SET rows = rows - 1 WHERE tbl = 'tasks' AND state = OLD.state;
        INSERT INTO counts VALUES ('tasks', NEW.state, 1, 0) ON CONFLICT DO UPDATE SET rows = rows + 1;
    END;
    CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks BEGIN
        UPDATE counts SET rows = rows - 1 WHERE tbl = 'tasks' AND state = OLD.state;
    END;
    """,
    # 4: a bounded database. Compaction (queue.py, RefQueue.compact) turns a TRAINED ref that nothing will read
    # again into its bare key in compacted_refs: exactly-once needs the key (a re-put of it is refused here, by
    # every writer), not the row with its handle, lease columns and seven index entries. The row's count stays
    # with TRAINED (status totals never drop). refs_trained walks trained rows in the order checkpoints made
    # them, so compaction resumes from its cursor and never re-reads the rows it keeps. refs_task tells
    # whether a done prompt task still has a ref row: once none is left its payload (the prompt) can go.
    """
    CREATE TABLE compacted_refs (
        key TEXT PRIMARY KEY
    ) WITHOUT ROWID;
    CREATE TABLE compaction_cursor (     -- one row: the last trained ref compaction looked at
        checkpoint_id INTEGER NOT NULL,
        ref_id        INTEGER NOT NULL
    );
    INSERT INTO compaction_cursor VALUES (0, 0);
    CREATE INDEX refs_trained ON refs(checkpoint_id, id) WHERE state = 3;
    CREATE INDEX refs_task ON refs(task_id) WHERE task_id IS NOT NULL;

    CREATE TRIGGER refs_put_compacted BEFORE INSERT ON refs
    WHEN EXISTS (SELECT 1 FROM compacted_refs WHERE key = NEW.key) BEGIN
        SELECT RAISE(IGNORE);
    END;
    DROP TRIGGER refs_count_delete;
    CREATE TRIGGER refs_count_delete AFTER DELETE ON refs
    WHEN NOT EXISTS (SELECT 1 FROM compacted_refs WHERE key = OLD.key) BEGIN
        UPDATE counts SET rows = rows - 1, bytes = bytes - OLD.nbytes WHERE tbl = 'refs' AND state = OLD.state;
        UPDATE store_bytes SET live = live - OLD.nbytes WHERE store = OLD.store AND OLD.state IN (0, 1);
    END;
    CREATE TRIGGER compacted_count_insert AFTER INSERT ON compacted_refs BEGIN
        INSERT INTO counts VALUES ('compacted_refs', 3, 1, 0) ON CONFLICT DO UPDATE SET rows = rows + 1;
    END;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class RunConnection(sqlite3.Connection):
    """A connection to a run database (what `connect` returns): it knows its WAL file, so that the write that
    takes the WAL past its bound can bring it back (truncate_wal) at the cost of one stat per commit."""

    wal_path = ""
    wal_retry_above = 0  # after a checkpoint that readers kept from finishing: WAL bytes before the next try


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that holds the write lock from its first statement; rolls back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    truncate_wal(conn)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest matching mount point)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = str(path.resolve())
    best, best_type = "", "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def _check_location(path: Path, allow_network_fs: bool) -> None:
    directory = path.parent
    if not directory.is_dir():
        raise DatabaseError(f"{path}: directory {directory} does not exist; create it or pick another --db path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DatabaseError(
            f"{path}: directory {directory} is not writable (SQLite needs it for the WAL); "
            "fix its permissions or pick another --db path"
        )
    fs = filesystem_type(directory)
    if fs in NETWORK_FILESYSTEMS and not allow_network_fs:
        raise DatabaseError(
            f"{path}: on a network filesystem ({fs}), where SQLite WAL is unsafe; put the database on a local "
            "disk, or pass --allow-network-fs if every process runs on this one host"
        )


def _check_identity(conn: sqlite3.Connection, path: Path) -> int:
    """Refuse another application's SQLite file or a newer schema; returns the schema version (0 = new)."""
    version, app_id, has_tables = conn.execute(  # one statement, so one snapshot while another process creates it
        """SELECT (SELECT user_version FROM pragma_user_version()),
                  (SELECT application_id FROM pragma_application_id()),
                  (SELECT count(*) > 0 FROM sqlite_master)"""
    ).fetchone()
    if app_id != APPLICATION_ID and (has_tables or version):
        raise DatabaseError(f"{path}: an SQLite file that is not a dataflow database; pass a new --db path")
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"{path}: schema version {version} is newer than this dataflow understands ({SCHEMA_VERSION}); "
            "upgrade dataflow"
        )
    return version


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (a trigger body holds semicolons of its own)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete statement in a migration: {pending.strip()[:80]}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with immediate(conn):
        version = _check_identity(conn, path)  # again under the write lock: another process may have created it
        for target in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[target]):
                conn.execute(statement)
        if version == 0:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('run_id', :run_id), ('created_at', :created_at)",
                {"run_id": json.dumps(uuid.uuid4().hex), "created_at": json.dumps(time.time())},
            )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _enable_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL, retrying while locked. Processes opening a new file at once can each hold a read lock
    while asking for the exclusive one; SQLite then answers "database is locked" at once, without waiting
    out busy_timeout (deadlock avoidance), so the wait happens here."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "database is locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def database_path(conn: sqlite3.Connection) -> str:
    """The file behind a connection ("" for an in-memory database)."""
    return next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "")


def wal_bytes(conn: sqlite3.Connection) -> int:
    """Size of the connection's WAL file (0 when there is none)."""
    try:
        return os.stat(getattr(conn, "wal_path", "") or database_path(conn) + "-wal").st_size
    except (FileNotFoundError, NotADirectoryError):
        return 0


def truncate_wal(conn: sqlite3.Connection, *, above: int | None = None) -> bool:
    """Once the WAL is past `above` bytes (default WAL_BOUND_BYTES), copy all of it into the database and
    truncate it to zero; whether that happened. SQLite's own (passive) checkpoints copy only the frames no
    reader still needs, and the WAL restarts from its beginning only when no reader is on it: readers that
    always overlap (a tight `status --watch`, two of them) starve both, and the WAL grew by 560 MB in 15 s
    (scripts/bench_scale.py measures it). A TRUNCATE checkpoint waits for the readers of old snapshots while
    new readers read the fully copied database. It holds writers off while it waits, so it waits briefly, and
    after a try that readers foiled this connection tries again only once the WAL grew by another quarter
    bound: a reader stuck inside a transaction (SIGSTOP) costs one short wait per quarter bound of writes
    instead of stalling every write."""
    bound = WAL_BOUND_BYTES if above is None else above
    size = wal_bytes(conn)
    if size <= max(bound, getattr(conn, "wal_retry_above", 0)):
        return False
    conn.execute(f"PRAGMA busy_timeout = {WAL_TRUNCATE_WAIT_MS}")
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.OperationalError:  # locked by another checkpoint; or a disk error the next write will name:
        busy = 1  # the caller's transaction is committed already and must not look failed
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if isinstance(conn, RunConnection):
        conn.wal_retry_above = size + bound // 4 if busy else 0
    return not busy


def connect(path: str | os.PathLike, *, allow_network_fs: bool = False) -> sqlite3.Connection:
    """Open (creating if needed) a run database, refusing anything unsafe with one clear line."""
    path = Path(path)
    _check_location(path, allow_network_fs)
    existed = path.exists()
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False,
                               factory=RunConnection)
        conn.wal_path = os.path.abspath(f"{path}-wal")
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _check_identity(conn, path)  # before anything writes: a refused file must be left exactly as it was
        mode = _enable_wal(conn)
    except sqlite3.DatabaseError as e:
        # The header is checked by SQLite itself: opening and closing the file from Python would drop the
        # POSIX locks that this process's other connections hold on it (fcntl locks are per process).
        if "file is not a database" in str(e):
            raise DatabaseError(f"{path}: not a dataflow database (not SQLite at all); pass a new --db path") from None
        raise DatabaseError(sqlite_problem(path, e)) from None
    if mode.lower() != "wal":
        raise DatabaseError(f"{path}: could not switch to WAL mode (got {mode}); put the database on a local disk")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    conn.execute("PRAGMA foreign_keys = ON")
    if not existed:
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    _migrate(conn, path)
    return conn
