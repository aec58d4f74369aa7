"""Lease discipline shared by the ref queue and the prompt tasks (both tables have the same lease columns).

A claim stamps each row with a fresh random token and a wall-clock deadline (`time.time()`: monotonic
clocks are not comparable across processes). Every later change is fenced on that token and on the row
still being LEASED, so a consumer whose lease expired cannot touch a row someone else now holds.
Callers hold a `BEGIN IMMEDIATE` transaction around these functions.
"""

from __future__ import annotations

import json
import sqlite3
from enum import IntEnum


class LeaseState(IntEnum):
    """States both tables share; each table adds its own on top (values must not collide)."""

    PENDING = 0
    LEASED = 1
    DEAD = 4


def reclaim_expired(conn: sqlite3.Connection, table: str, now: float, max_attempts: int) -> int:
    """Expired leases go back to PENDING, or to DEAD once they used up max_attempts."""
    cur = conn.execute(
        f"""UPDATE {table}
            SET state = CASE WHEN attempts >= :max_attempts THEN {LeaseState.DEAD:d} ELSE {LeaseState.PENDING:d} END,
                last_error = 'lease expired (owner ' || coalesce(lease_owner, '?') || ')',
                lease_token = NULL
            WHERE state = {LeaseState.LEASED:d} AND lease_deadline < :now""",
        {"now": now, "max_attempts": max_attempts},
    )
    return cur.rowcount


def claim(
    conn: sqlite3.Connection, table: str, owner: str, n: int, deadline: float, extra_where: str = "", **params
) -> list[sqlite3.Row]:
    """Lease up to n PENDING rows in id order, served by the (state, id) index; returns them sorted by id."""
    rows = conn.execute(
        f"""UPDATE {table}
            SET state = {LeaseState.LEASED:d}, lease_token = lower(hex(randomblob(16))), lease_owner = :owner,
                lease_deadline = :deadline, attempts = attempts + 1
            WHERE id IN (SELECT id FROM {table} WHERE state = {LeaseState.PENDING:d} {extra_where} ORDER BY id LIMIT :n)
            RETURNING *""",
        {"owner": owner, "deadline": deadline, "n": n, **params},
    ).fetchall()
    return sorted(rows, key=lambda r: r["id"])


def fail(conn: sqlite3.Connection, table: str, token: str, error: str, retryable: bool, max_attempts: int) -> bool:
    """Give a leased row back (retryable, attempts left) or bury it as DEAD with its error. Fenced."""
    cur = conn.execute(
        f"""UPDATE {table}
            SET state = CASE WHEN :retryable AND attempts < :max_attempts
                        THEN {LeaseState.PENDING:d} ELSE {LeaseState.DEAD:d} END,
                last_error = :error, lease_token = NULL
            WHERE lease_token = :token AND state = {LeaseState.LEASED:d}""",
        {"token": token, "error": error, "retryable": retryable, "max_attempts": max_attempts},
    )
    return cur.rowcount == 1


def extend(conn: sqlite3.Connection, table: str, tokens: list[str], deadline: float) -> list[str]:
    """Push the deadline of held leases; returns the tokens that are no longer held."""
    held = conn.execute(
        f"""UPDATE {table} SET lease_deadline = :deadline
            WHERE state = {LeaseState.LEASED:d} AND lease_token IN (SELECT value FROM json_each(:tokens))
            RETURNING lease_token""",
        {"deadline": deadline, "tokens": json.dumps(list(tokens))},
    ).fetchall()
    return sorted(set(tokens) - {r[0] for r in held})


def counts(conn: sqlite3.Connection, table: str, states: type[IntEnum]) -> dict[str, int]:
    by_state = dict(conn.execute(f"SELECT state, count(*) FROM {table} GROUP BY state").fetchall())
    return {s.name.lower(): by_state.get(s.value, 0) for s in states}
