"""connect(): what it refuses (one clear line each), how it configures SQLite, and WAL hygiene."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import zlib

import pytest

from dataflow.control import db as control_db
from dataflow.control.db import JOURNAL_SIZE_LIMIT, SCHEMA_VERSION, SHARDS, connect, immediate, truncate_wal, wal_bytes
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue, shard_of
from dataflow.control.tasks import TaskQueue
from dataflow.errors import DatabaseError
from test_control_support import item


def refusal(path, **kwargs) -> str:
    with pytest.raises(DatabaseError) as e:
        connect(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("just some text, long enough to be mistaken for nothing")
    assert "not a dataflow database" in refusal(path)
    assert path.read_text().startswith("just some text")  # left untouched


def test_an_sqlite_file_of_another_application_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    other.commit()
    other.close()
    before = path.read_bytes()
    assert "not a dataflow database" in refusal(path)
    assert path.read_bytes() == before  # refused untouched: not even switched to WAL
    assert not path.with_name(path.name + "-wal").exists()


def test_a_schema_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "run.sqlite"
    conn = connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    message = refusal(path)
    assert f"schema version {SCHEMA_VERSION + 5}" in message and "upgrade dataflow" in message


def test_a_database_on_a_network_filesystem_is_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(control_db, "filesystem_type", lambda path: "nfs")
    path = tmp_path / "run.sqlite"
    message = refusal(path)
    assert "network filesystem (nfs)" in message and "--allow-network-fs" in message
    assert not path.exists()
    conn = connect(path, allow_network_fs=True)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_missing_directory_is_refused(tmp_path):
    message = refusal(tmp_path / "no" / "such" / "dir" / "run.sqlite")
    assert "does not exist" in message


def test_an_unwritable_directory_is_refused(tmp_path, monkeypatch):
    # Permission bits do not stop root, so pretend the directory is read-only the way access(2) would report it.
    real_access = os.access
    monkeypatch.setattr(
        control_db.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode)
    )
    assert "not writable" in refusal(tmp_path / "run.sqlite")


def test_the_filesystem_type_of_a_local_directory_is_found(tmp_path):
    assert control_db.filesystem_type(tmp_path) not in control_db.NETWORK_FILESYSTEMS | {"unknown"}


def test_a_new_database_is_private_to_its_owner(tmp_path):
    path = tmp_path / "run.sqlite"
    connect(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_connections_use_wal_normal_sync_a_busy_timeout_and_a_journal_limit(tmp_path):
    conn = connect(tmp_path / "run.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == JOURNAL_SIZE_LIMIT
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.isolation_level is None  # autocommit: transactions only where immediate() opens one


def test_reconnecting_keeps_the_run_id_and_migrates_nothing_twice(tmp_path):
    path = tmp_path / "run.sqlite"
    first = RunMeta(connect(path)).run_id
    assert len(first) == 32 and RunMeta(connect(path)).run_id == first


def test_an_error_inside_immediate_rolls_back_everything(tmp_path):
    conn = connect(tmp_path / "run.sqlite")
    with pytest.raises(RuntimeError):
        with immediate(conn):
            conn.execute("INSERT INTO meta(key, value) VALUES ('x', '1')")
            raise RuntimeError("boom")
    assert conn.execute("SELECT count(*) FROM meta WHERE key = 'x'").fetchone()[0] == 0
    assert not conn.in_transaction


def query_plan(conn: sqlite3.Connection, sql: str, **params) -> str:
    return " | ".join(r["detail"] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def claim_statements(conn: sqlite3.Connection, partition: tuple[int, int]) -> list[str]:
    """The UPDATE statements a real lease() runs, with their parameters bound (from SQLite's trace)."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        RefQueue(conn).lease("t", n=8, partition=partition)
    finally:
        conn.set_trace_callback(None)
    return list(dict.fromkeys(sql for sql in seen if "randomblob" in sql))  # a trigger re-reports its statement


@pytest.mark.parametrize("partition", [(0, 1), (1, 2)])
def test_the_claim_is_served_by_an_index_without_walking_or_sorting_the_backlog(tmp_path, partition):
    conn = connect(tmp_path / "run.sqlite")
    keys = [f"k{i}" for i in range(2000)]
    RefQueue(conn).put_many([item(k) for k in keys if shard_of(k) % 2 == 0])  # rank 1 of 2: own shards empty
    statements = claim_statements(conn, partition)
    assert len(statements) == partition[1]  # rank 1 of 2: its own shards, then the global pool
    for analyzed in (False, True):  # and with real statistics, as a long run would have
        if analyzed:
            conn.execute("ANALYZE")
        for sql in statements:
            plan = query_plan(conn, sql)
            assert "SCAN refs" not in plan, plan
            if "shard =" in sql:  # one seek per own shard; a temp b-tree there orders at most n ids of one shard
                assert plan.count("SEARCH refs USING COVERING INDEX refs_shard_claim") == SHARDS // 2, plan
            else:
                assert "refs_claim" in plan and "TEMP B-TREE" not in plan, plan


def test_ack_extend_and_fail_never_scan_the_whole_table(tmp_path):
    # served by the token index, or by a state index limited to LEASED rows (bounded by what is in flight)
    conn = connect(tmp_path / "run.sqlite")
    queue = RefQueue(conn)
    queue.put_many([item(str(i)) for i in range(100)])
    a, b, c = queue.lease("t", n=3)
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    queue.extend([a.token], 60.0)
    queue.ack([a.token])
    queue.fail(b.token, "x")
    queue.mark_lost(c.token, "gone")
    conn.set_trace_callback(None)
    fenced = [sql for sql in dict.fromkeys(seen)  # a trigger re-reports its statement
              if "lease_token" in sql and "WHERE" in sql and not sql.startswith("UPDATE tasks")]
    assert len(fenced) == 5
    for sql in fenced:
        plan = query_plan(conn, sql)
        assert "SEARCH refs USING" in plan and "SCAN refs" not in plan, plan


def test_the_expiry_sweep_is_served_by_an_index(tmp_path):
    conn = connect(tmp_path / "run.sqlite")
    plan = query_plan(conn, "SELECT id FROM refs WHERE state = 1 AND lease_deadline < :now", now=0.0)
    assert "refs_expiry" in plan, plan


def test_the_write_that_takes_the_wal_past_its_bound_truncates_it(tmp_path, monkeypatch):
    bound = 256 * 1024  # small, so a few MiB of writes show whether the WAL is bounded
    monkeypatch.setattr(control_db, "WAL_BOUND_BYTES", bound)
    path = tmp_path / "run.sqlite"
    conn = connect(path)
    queue = RefQueue(conn)
    written = largest = 0
    for batch in range(40):
        queue.put_many([item(f"{batch}-{i}") for i in range(100)])
        for lease in queue.lease("t", n=100):  # one transaction per ack: the worst case for WAL growth
            queue.ack([lease.token])
            written += 1
            largest = max(largest, wal_bytes(conn))
    assert queue.counts()["acked"] == 4000
    assert largest <= bound + 64 * 1024  # one small transaction past the bound at most


def test_the_wal_bound_gives_way_to_a_reader_stuck_in_a_transaction_and_catches_up_after(tmp_path, monkeypatch):
    path = tmp_path / "run.sqlite"
    writer, reader = connect(path), connect(path)
    queue = RefQueue(writer)
    queue.put_many([item(f"a{i}") for i in range(200)])
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM refs").fetchone()[0] == 200  # holds its snapshot, like a SIGSTOP
    queue.put_many([item(f"b{i}") for i in range(200)])
    bound = wal_bytes(writer) // 2
    monkeypatch.setattr(control_db, "WAL_BOUND_BYTES", bound)
    started = time.monotonic()
    assert not truncate_wal(writer)  # it cannot copy what the reader still reads: it gives up, briefly
    assert time.monotonic() - started < control_db.BUSY_TIMEOUT_MS / 1000 / 10
    reader.execute("COMMIT")
    assert not truncate_wal(writer)  # and tries again only once the WAL grew by another quarter bound
    for i in range(1000):
        queue.put_many([item(f"c{i}")])  # each commit looks at the WAL
        if wal_bytes(writer) < bound:
            break
    assert wal_bytes(writer) == 0 and queue.counts()["pending"] == 400 + i + 1


def database_of_schema(db, version: int) -> sqlite3.Connection:
    """A run database as the release of schema `version` created it (its migrations, its run id)."""
    raw = sqlite3.connect(db, isolation_level=None)
    for migration in control_db.MIGRATIONS[:version]:
        for statement in control_db._statements(migration):
            raw.execute(statement)
    raw.execute(f"PRAGMA application_id = {control_db.APPLICATION_ID}")
    raw.execute(f"PRAGMA user_version = {version}")
    raw.execute("""INSERT INTO meta VALUES ('run_id', '"0123456789abcdef0123456789abcdef"')""")
    return raw


def test_a_database_made_by_the_previous_schema_is_carried_forward(tmp_path):
    """Schema 2 as its release wrote it (full crc32 shards, no counters)."""
    db = tmp_path / "run.sqlite"
    raw = database_of_schema(db, 2)
    raw.execute("INSERT INTO tasks(key, payload, state, created_at) VALUES ('p0', '{}', 2, 0), ('p1', '{}', 0, 0)")
    keys = [f"k{i}" for i in range(40)]
    for i, key in enumerate(keys):  # 30 pending, 10 acked; 4096 bytes each, in two stores
        raw.execute("INSERT INTO refs(key, shard, state, store, handle, nbytes, created_at) VALUES (?, ?, ?, ?, '{}', 4096, 0)",
                    (key, zlib.crc32(key.encode()), 0 if i < 30 else 2, "a" if i % 2 else "b"))
    raw.close()

    conn = connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    queue, tasks = RefQueue(conn), TaskQueue(conn)
    assert queue.counts() == {"pending": 30, "leased": 0, "acked": 10, "trained": 0, "dead": 0, "lost": 0}
    assert tasks.counts() == {"pending": 1, "leased": 0, "done": 1, "dead": 0} and tasks.remaining() == 1
    assert (queue.live_bytes("a"), queue.live_bytes("b"), queue.live_bytes()) == (15 * 4096, 15 * 4096, 30 * 4096)
    own = queue.lease("rank-1", n=30, partition=(1, 2))
    assert all(shard_of(lease.key) % 2 == 1 for lease in own[: sum(shard_of(k) % 2 for k in keys[:30])])
    assert queue.counts()["leased"] == 30 and queue.live_bytes() == 30 * 4096  # the counters keep counting
    assert RunMeta(conn).run_id == "0123456789abcdef0123456789abcdef"


def test_a_schema_3_database_with_trained_refs_is_carried_forward_and_compacts(tmp_path):
    """Schema 3 as the previous release wrote it: trained refs, counters kept by its triggers, no compaction."""
    db = tmp_path / "run.sqlite"
    raw = database_of_schema(db, 3)
    raw.execute("INSERT INTO checkpoints(step, path, created_at, num_refs) VALUES (10, 'ckpt', 0, 20)")
    for i in range(30):  # 20 trained by checkpoint 1, 10 pending
        raw.execute("""INSERT INTO refs(key, shard, state, store, handle, nbytes, created_at, checkpoint_id)
                       VALUES (?, ?, ?, 'shm', '{}', 4096, 0, ?)""",
                    (f"k{i}", shard_of(f"k{i}"), 3 if i < 20 else 0, 1 if i < 20 else None))
    raw.close()

    conn = connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    queue = RefQueue(conn)
    counts = {"pending": 10, "leased": 0, "acked": 0, "trained": 20, "dead": 0, "lost": 0}
    assert queue.counts() == counts and queue.compacted() == 0
    assert queue.compact(through_checkpoint=1).compacted == 20
    assert queue.counts() == counts and queue.compacted() == 20 and queue.live_bytes() == 10 * 4096
    assert queue.put_many([item("k0"), item("k29"), item("k30")]) == [False, False, True]
