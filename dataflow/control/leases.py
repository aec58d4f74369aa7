"""Lease discipline shared by the ref queue and the prompt tasks (both tables have the same lease columns).

A claim stamps each row with a fresh random token and a wall-clock deadline (`time.time()`: monotonic
clocks are not comparable across processes). Every later change is fenced on that token and on the row
still being LEASED, so a consumer whose lease expired cannot touch a row someone else now holds.

Owners are process incarnations (a restarted process gets a new owner string), so "own" means "held by
this very process": a process never reclaims its own leases (a wall-clock jump past the ttl would
otherwise hand its carried sample back to itself under a new token), and renews them before it claims.
`attempts` counts errors raised while processing a row (`fail`), not leases: a lease that lapsed or was
given back because its holder died or stopped is no fault of the row.
Callers hold a `BEGIN IMMEDIATE` transaction around these functions.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import IntEnum


class LeaseState(IntEnum):
    """States both tables share; each table adds its own on top (values must not collide)."""

    PENDING = 0
    LEASED = 1
    DEAD = 4


@dataclass(frozen=True)
class Dead:
    """A row that used up its attempts (a ref or a prompt task), kept with its last error."""

    id: int
    key: str
    attempts: int
    last_error: str | None


def dead(conn: sqlite3.Connection, table: str, limit: int) -> list[Dead]:
    rows = conn.execute(
        f"SELECT id, key, attempts, last_error FROM {table} WHERE state = {LeaseState.DEAD:d} ORDER BY id LIMIT :limit",
        {"limit": limit},
    ).fetchall()
    return [Dead(**dict(r)) for r in rows]


def requeue_dead(conn: sqlite3.Connection, table: str, ids: list[int] | None) -> int:
    """Give dead rows a fresh set of attempts (all of them, or those ids)."""
    where = "" if ids is None else "AND id IN (SELECT value FROM json_each(:ids))"
    return conn.execute(
        f"""UPDATE {table} SET state = {LeaseState.PENDING:d}, attempts = 0, lease_token = NULL
            WHERE state = {LeaseState.DEAD:d} {where}""",
        {"ids": json.dumps(ids or [])},
    ).rowcount


def renew_owned(conn: sqlite3.Connection, table: str, owner: str, deadline: float) -> int:
    """Push the deadline of every lease `owner` holds (served by the (state, id) index: leased rows only)."""
    return conn.execute(
        f"UPDATE {table} SET lease_deadline = :deadline WHERE state = {LeaseState.LEASED:d} AND lease_owner = :owner",
        {"deadline": deadline, "owner": owner},
    ).rowcount


def reclaim_expired(conn: sqlite3.Connection, table: str, now: float, except_owner: str | None = None) -> int:
    """Expired leases of other owners go back to PENDING (their attempts unchanged: the holder died or stalled)."""
    cur = conn.execute(
        f"""UPDATE {table}
            SET state = {LeaseState.PENDING:d}, lease_token = NULL,
                last_error = 'lease expired (owner ' || coalesce(lease_owner, '?') || ')'
            WHERE state = {LeaseState.LEASED:d} AND lease_deadline < :now
              AND (:except_owner IS NULL OR lease_owner IS NOT :except_owner)""",
        {"now": now, "except_owner": except_owner},
    )
    return cur.rowcount


def release_owners(conn: sqlite3.Connection, table: str, owner_prefix: str, keep_owner: str, reason: str) -> int:
    """Leases of owners named `owner_prefix...` other than `keep_owner` go back to PENDING at once: the caller
    proved their holders dead (it holds the lock they held). Not a failure of the rows."""
    return conn.execute(
        f"""UPDATE {table} SET state = {LeaseState.PENDING:d}, lease_token = NULL, last_error = :reason
            WHERE state = {LeaseState.LEASED:d} AND substr(lease_owner, 1, length(:prefix)) = :prefix
              AND lease_owner != :keep""",
        {"prefix": owner_prefix, "keep": keep_owner, "reason": reason},
    ).rowcount


def claim(
    conn: sqlite3.Connection, table: str, owner: str, n: int, deadline: float, candidates: str | None = None
) -> list[sqlite3.Row]:
    """Lease up to n PENDING rows: the first n by id (served by the (state, id) index), or the ids the
    `candidates` query picks (it may use :n). Returns them sorted by id."""
    params = {"owner": owner, "deadline": deadline, "n": n}
    if candidates is None:
        chosen = f"SELECT id FROM {table} WHERE state = {LeaseState.PENDING:d} ORDER BY id LIMIT :n"
    else:  # picked first, by their own statement: nested in the UPDATE, a compound query runs ~20x slower
        params["ids"] = json.dumps([r[0] for r in conn.execute(candidates, {"n": n})])
        chosen = "SELECT value FROM json_each(:ids)"
    rows = conn.execute(
        f"""UPDATE {table}
            SET state = {LeaseState.LEASED:d}, lease_token = lower(hex(randomblob(16))), lease_owner = :owner,
                lease_deadline = :deadline
            WHERE id IN ({chosen}) AND state = {LeaseState.PENDING:d}
            RETURNING *""",
        params,
    ).fetchall()
    return sorted(rows, key=lambda r: r["id"])


def fail(conn: sqlite3.Connection, table: str, token: str, error: str, retryable: bool, max_attempts: int) -> bool:
    """Processing the row raised: count the attempt, and give the row back (retryable, attempts left) or bury it
    as DEAD with its error. Fenced."""
    cur = conn.execute(
        f"""UPDATE {table}
            SET attempts = attempts + 1,
                state = CASE WHEN :retryable AND attempts + 1 < :max_attempts
                        THEN {LeaseState.PENDING:d} ELSE {LeaseState.DEAD:d} END,
                last_error = :error, lease_token = NULL
            WHERE lease_token = :token AND state = {LeaseState.LEASED:d}""",
        {"token": token, "error": error, "retryable": retryable, "max_attempts": max_attempts},
    )
    return cur.rowcount == 1


def release(conn: sqlite3.Connection, table: str, tokens: list[str], reason: str) -> list[str]:
    """Give held leases back untried (the holder stops); returns the tokens that were no longer held. Fenced."""
    params = {"reason": reason, "tokens": json.dumps(list(tokens))}
    held_where = f"state = {LeaseState.LEASED:d} AND lease_token IN (SELECT value FROM json_each(:tokens))"
    held = {r[0] for r in conn.execute(f"SELECT lease_token FROM {table} WHERE {held_where}", params)}
    conn.execute(
        f"UPDATE {table} SET state = {LeaseState.PENDING:d}, lease_token = NULL, last_error = :reason WHERE {held_where}",
        params,
    )
    return sorted(set(tokens) - held)


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
    """Rows per state, from the counters the table's triggers keep (a few rows read, whatever the size)."""
    by_state = dict(conn.execute("SELECT state, rows FROM counts WHERE tbl = :table", {"table": table}).fetchall())
    return {s.name.lower(): by_state.get(s.value, 0) for s in states}
