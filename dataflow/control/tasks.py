"""Prompt tasks: the dataset split among rollout workers with the same lease discipline as refs.

A task is one sample to produce. `complete` commits its refs and closes the task in one transaction, so a
rollout killed at any instant either produced the sample (and will not again) or will produce it later.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable

from dataflow.control import clock
from dataflow.control import leases
from dataflow.control import queue as ref_rows
from dataflow.control.db import immediate
from dataflow.control.leases import LeaseState


class TaskState(IntEnum):
    PENDING = LeaseState.PENDING
    LEASED = LeaseState.LEASED
    DONE = 2
    DEAD = LeaseState.DEAD


def requeue_rows(conn: sqlite3.Connection, task_ids: Iterable[int | None]) -> None:
    """Inside the caller's transaction: send finished prompt tasks back so a rollout regenerates their
    lost features (a task someone holds right now is left to its holder)."""
    ids = [t for t in task_ids if t is not None]
    conn.execute(
        f"""UPDATE tasks SET state = {TaskState.PENDING:d}, attempts = 0, lease_token = NULL, done_at = NULL
            WHERE id IN (SELECT value FROM json_each(:ids)) AND state != {TaskState.LEASED:d}""",
        {"ids": json.dumps(ids)},
    )


def forget_payloads(conn: sqlite3.Connection, task_ids: Iterable[int | None]) -> None:
    """Inside the caller's transaction (compaction): DONE tasks none of whose refs has a row left keep their
    key (a restarted rollout's add_many must still find it, or it would generate the prompt again) but not
    their payload, the prompt itself, often kilobytes: it is read again only to regenerate a lost ref, and
    a compacted ref is never lost."""
    conn.execute(
        f"""UPDATE tasks SET payload = '{{}}'
            WHERE id IN (SELECT value FROM json_each(:ids)) AND state = {TaskState.DONE:d}
              AND NOT EXISTS (SELECT 1 FROM refs WHERE refs.task_id = tasks.id)""",
        {"ids": json.dumps([t for t in task_ids if t is not None])},
    )


@dataclass(frozen=True)
class TaskLease:
    id: int
    key: str
    token: str
    payload: dict
    attempts: int


class TaskQueue:
    def __init__(self, conn: sqlite3.Connection, max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.conn = conn
        self.max_attempts = max_attempts

    def add_many(self, items: list[tuple[str, dict]]) -> int:
        """Add (key, payload) tasks; keys already present are left alone. Returns how many were new."""
        now = clock.now()
        with immediate(self.conn):
            before = sum(self.counts().values())  # not total_changes: the count triggers change rows too
            self.conn.executemany(
                "INSERT OR IGNORE INTO tasks(key, payload, created_at) VALUES (?, ?, ?)",
                [(key, json.dumps(payload), now) for key, payload in items],
            )
            return sum(self.counts().values()) - before

    def payloads(self) -> list[tuple[str, dict]]:
        """Every task's (key, payload) in the order they were added (one row per sample: the eval reads them)."""
        rows = self.conn.execute("SELECT key, payload FROM tasks ORDER BY id").fetchall()
        return [(row["key"], json.loads(row["payload"])) for row in rows]

    def lease(self, owner: str, n: int = 1, ttl: float = 300.0) -> list[TaskLease]:
        """Claim up to n tasks. `owner` names this process incarnation (a restart is another owner): its own
        leases are renewed first and never reclaimed by itself."""
        now = clock.now()
        with immediate(self.conn):
            leases.renew_owned(self.conn, "tasks", owner, now + ttl)
            leases.reclaim_expired(self.conn, "tasks", now, except_owner=owner)
            rows = leases.claim(self.conn, "tasks", owner, n, now + ttl)
        return [TaskLease(r["id"], r["key"], r["lease_token"], json.loads(r["payload"]), r["attempts"]) for r in rows]

    def complete(self, token: str, refs: list[ref_rows.RefItem] = ()) -> bool:
        """Put the task's refs and mark it DONE, atomically. False (and nothing put) if the lease is not yours."""
        now = clock.now()
        with immediate(self.conn):
            row = self.conn.execute(
                f"""UPDATE tasks SET state = {TaskState.DONE:d}, done_at = :now, lease_token = NULL
                    WHERE lease_token = :token AND state = {TaskState.LEASED:d} RETURNING id""",
                {"token": token, "now": now},
            ).fetchone()
            if row is None:
                return False
            ref_rows.put_rows(self.conn, [ref_rows.RefItem(r.key, r.handle, r.nbytes, r.store, row[0]) for r in refs], now)
        return True

    def set_payload(self, token: str, payload: dict) -> bool:
        """Store a payload under a held lease; False (nothing stored) when the lease is no longer ours."""
        with immediate(self.conn):
            cur = self.conn.execute(
                f"UPDATE tasks SET payload = :payload WHERE lease_token = :token AND state = {TaskState.LEASED:d}",
                {"payload": json.dumps(payload), "token": token},
            )
        return cur.rowcount == 1

    def fail(self, token: str, error: str, retryable: bool = True) -> bool:
        with immediate(self.conn):
            return leases.fail(self.conn, "tasks", token, error, retryable, self.max_attempts)

    def extend(self, tokens: list[str], ttl: float) -> list[str]:
        """Push held leases' deadlines; returns the tokens no longer held (lost: drop that work)."""
        with immediate(self.conn):
            return leases.extend(self.conn, "tasks", tokens, clock.now() + ttl)

    def release_owned(self, owner: str, reason: str) -> int:
        """Every lease `owner` (one process incarnation) holds goes back untried, also one whose grant the
        holder never saw: a stop that lands between the grant and the holder's bookkeeping (in Ray mode an
        exception raised into the rollout's thread) would otherwise leave it to expire. An incarnation id
        (`<id>@<pid>-<8 hex>`) is the prefix of no other owner."""
        with immediate(self.conn):
            return leases.release_owners(self.conn, "tasks", owner, "", reason)

    def dead(self, limit: int = 100) -> list[leases.Dead]:
        return leases.dead(self.conn, "tasks", limit)

    def requeue_dead(self, ids: list[int] | None = None) -> int:
        """Give dead prompt tasks a fresh set of attempts (all of them, or those ids)."""
        with immediate(self.conn):
            return leases.requeue_dead(self.conn, "tasks", ids)

    def counts(self) -> dict[str, int]:
        return leases.counts(self.conn, "tasks", TaskState)

    def remaining(self) -> int:
        """Tasks not yet produced: pending or leased (an expired lease still counts; it will come back)."""
        counts = self.counts()
        return counts["pending"] + counts["leased"]
