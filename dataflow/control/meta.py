"""Run metadata: config, heartbeats, end-of-stream / finished marks, and durable checkpoints."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from dataclasses import dataclass

from dataflow.control import clock
from dataflow.control.db import immediate
from dataflow.control import queue as ref_rows
from dataflow.errors import ConfigMismatch

STALE_AFTER_S = 30.0  # a process whose heartbeat is older than this is presumed dead
EXIT_STATUSES = ("finished", "stopped", "interrupted")  # a last heartbeat's status on a clean or caught exit


@dataclass(frozen=True)
class Process:
    id: str
    role: str
    pid: int
    host: str
    started_at: float
    heartbeat_at: float
    status: str
    info: dict

    def alive(self, now: float | None = None, stale_after: float = STALE_AFTER_S) -> bool:
        """Heartbeating, and its last heartbeat did not say it exited (then it is gone at once, not 30 s later)."""
        return not self.status.startswith(EXIT_STATUSES) and (now or clock.now()) - self.heartbeat_at < stale_after


@dataclass(frozen=True)
class Checkpoint:
    id: int
    step: int
    path: str
    created_at: float
    num_refs: int


class RunMeta:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    @property
    def run_id(self) -> str:
        return self.get("run_id")

    def get(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, key: str, value) -> None:
        with immediate(self.conn):
            self.conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    def set_once(self, key: str, value):
        """Record `value` unless `key` has one already; returns the recorded value (the first writer wins)."""
        with immediate(self.conn):
            self.conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))
        return self.get(key)

    def record_or_check_config(self, section: str, config: dict) -> None:
        """Record `config` the first time a section is seen; afterwards refuse any differing key. A key the
        record lacks is an option added after the run started: it is accepted and recorded."""
        key = f"config.{section}"
        config = json.loads(json.dumps(config))  # normalise tuples, paths-as-str, etc. as stored
        with immediate(self.conn):
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(config)))
                return
            recorded = json.loads(row[0])
            if set(config) - set(recorded):  # options added since the run started: recorded as they are now
                self.conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(config | recorded), key))
        differing = [name for name in sorted(set(recorded) | set(config)) if recorded.get(name) != config.get(name)
                     and name in recorded]
        if differing:  # every one at once, named as the flags that set them
            changes = ", ".join(f"--{name.replace('_', '-')} {recorded.get(name)!r} (now {config.get(name)!r})"
                                for name in differing)
            raise ConfigMismatch(f"this run was started with other {section} options: {changes}; use the original "
                                 "values or start a new run with another --db")

    def heartbeat(
        self, process_id: str, role: str, status: str = "running", info: dict | None = None,
        *, pid: int | None = None, host: str | None = None,
    ) -> None:
        """pid/host default to the calling process's; a ledger that writes for remote processes passes theirs."""
        now = clock.now()
        with immediate(self.conn):
            self.conn.execute(
                """INSERT INTO processes(id, role, pid, host, started_at, heartbeat_at, status, info)
                   VALUES (:id, :role, :pid, :host, :now, :now, :status, :info)
                   ON CONFLICT(id) DO UPDATE SET
                       heartbeat_at = :now, status = :status, info = :info, role = :role,
                       started_at = CASE WHEN processes.pid != :pid THEN :now ELSE processes.started_at END,
                       pid = :pid, host = :host""",
                {
                    "id": process_id,
                    "role": role,
                    "pid": os.getpid() if pid is None else pid,
                    "host": socket.gethostname() if host is None else host,
                    "now": now,
                    "status": status,
                    "info": json.dumps(info or {}),
                },
            )

    def processes(self, role: str | None = None) -> list[Process]:
        rows = self.conn.execute(
            "SELECT * FROM processes WHERE :role IS NULL OR role = :role ORDER BY id", {"role": role}
        ).fetchall()
        return [Process(**{**dict(r), "info": json.loads(r["info"])}) for r in rows]

    def set_end_of_stream(self) -> None:
        self.set("end_of_stream", True)

    def end_of_stream(self) -> bool:
        return bool(self.get("end_of_stream", False))

    def set_run_finished(self) -> None:
        """The trainer consumed a drained stream: the run is over for good. Never set by a pause (--max-steps,
        SIGTERM, idle). Recorded under a new key, so an older version's pause mark is not read as an end."""
        self.set("run_finished", True)

    def run_finished(self) -> bool:
        return bool(self.get("run_finished", False))

    def with_prefix(self, prefix: str) -> dict:
        """Every meta entry whose key starts with `prefix`, keyed by the rest of the key."""
        rows = self.conn.execute(
            "SELECT key, value FROM meta WHERE substr(key, 1, :n) = :prefix", {"n": len(prefix), "prefix": prefix}
        ).fetchall()
        return {r["key"][len(prefix) :]: json.loads(r["value"]) for r in rows}

    def record_checkpoint(self, step: int, path: str, ref_ids: list[int]) -> int:
        """Invariant 5: in one transaction, note the durable checkpoint and move the refs its update
        contains from ACKED to TRAINED."""
        with immediate(self.conn):
            checkpoint_id = self.conn.execute(
                "INSERT INTO checkpoints(step, path, created_at, num_refs) VALUES (?, ?, ?, 0) RETURNING id",
                (step, str(path), clock.now()),
            ).fetchone()[0]
            moved = ref_rows.mark_trained_rows(self.conn, ref_ids, checkpoint_id)
            # num_refs counts what this checkpoint really made TRAINED, not what the caller listed.
            self.conn.execute("UPDATE checkpoints SET num_refs = ? WHERE id = ?", (moved, checkpoint_id))
        return checkpoint_id

    def checkpoint_before(self, moment: float) -> int:
        """Id of the last checkpoint recorded before `moment` (0: none)."""
        return self.conn.execute(
            "SELECT coalesce(max(id), 0) FROM checkpoints WHERE created_at < :moment", {"moment": moment}
        ).fetchone()[0]

    def last_checkpoint(self) -> Checkpoint | None:
        row = self.conn.execute("SELECT * FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else Checkpoint(**dict(row))
