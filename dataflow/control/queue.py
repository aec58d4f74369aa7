"""The ref queue: one row per sample whose features sit in a feature store, with its life cycle.

    pending --lease--> leased --ack--> acked --checkpoint durable--> trained --compact--> key only
       ^                 |  \\--fail (retryable, attempts+1)--> pending
       |                 |  \\--fail, attempts used up (or not retryable)--> dead (kept, with last error)
       +--lease expired, released on stop, or holder restarted (attempts unchanged)--+
    leased|pending --features lost--> lost --> its prompt task re-queued (a re-put revives the key)

Only an error raised while processing a ref (`fail`) spends one of its attempts: a holder that died or
stopped is no fault of the ref, so a crash-looping trainer cannot bury innocent samples. A compacted ref
lives on as its key in compacted_refs (exactly-once) and in the TRAINED counts (status); see `compact`.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Collection, Iterable

from dataflow.control import clock
from dataflow.control import leases
from dataflow.control import tasks as task_rows
from dataflow.control.db import SHARDS, immediate
from dataflow.control.leases import LeaseState
from dataflow.keys import EPOCH_MARK


class RefState(IntEnum):
    PENDING = LeaseState.PENDING
    LEASED = LeaseState.LEASED
    ACKED = 2
    TRAINED = 3
    DEAD = LeaseState.DEAD
    LOST = 5


LIVE_STATES = (RefState.PENDING, RefState.LEASED)  # states whose feature bytes must stay intact
RATE_SAMPLE = 2000  # latest events a rate is computed from
RATE_WINDOW_S = 60.0  # status rates look this far back: compaction leaves the rows of that window alone
COMPACT_BATCH = 500  # rows per compaction transaction: ~10 ms of write lock (35-60k rows/s measured)


@dataclass(frozen=True)
class RefItem:
    key: str
    handle: dict
    nbytes: int
    store: str
    task_id: int | None = None


@dataclass(frozen=True)
class Lease:
    id: int
    key: str
    token: str
    handle: dict
    nbytes: int
    store: str
    attempts: int
    deadline: float
    task_id: int | None


@dataclass(frozen=True)
class AckedRef:
    id: int
    handle: dict


# The trained rows after the compaction cursor, as two seeks of refs_trained: the rest of the cursor's own
# checkpoint, then the later checkpoints up to :through (a row-value (checkpoint_id, id) > (...) comparison
# seeks on checkpoint_id only and would re-walk the kept rows of the cursor's checkpoint).
TRAINED_AFTER_CURSOR = f"""
    SELECT * FROM (SELECT id, key, store, checkpoint_id, task_id FROM refs INDEXED BY refs_trained
                   WHERE state = {RefState.TRAINED:d} AND checkpoint_id = :checkpoint AND id > :id ORDER BY id LIMIT :limit)
    UNION ALL
    SELECT * FROM (SELECT id, key, store, checkpoint_id, task_id FROM refs INDEXED BY refs_trained
                   WHERE state = {RefState.TRAINED:d} AND checkpoint_id > :checkpoint AND checkpoint_id <= :through
                   ORDER BY checkpoint_id, id LIMIT :limit)"""


@dataclass(frozen=True)
class Compaction:
    examined: int  # trained rows looked at (fewer than the limit asked: compaction has caught up)
    compacted: int  # of those, the rows that became bare keys


def shard_of(key: str) -> int:
    return zlib.crc32(key.encode()) % SHARDS


def own_shards_query(rank: int, world: int) -> str | None:
    """Ids of the first :n PENDING refs in rank's own shards, by id: one index seek per shard (a range of
    (state, shard, id)), merged; never a walk over other shards' rows. None when the rank owns no shard."""
    shards = [s for s in range(SHARDS) if s % world == rank]
    if not shards:
        return None
    per_shard = " UNION ALL ".join(
        f"SELECT id FROM (SELECT id FROM refs WHERE state = {RefState.PENDING:d} AND shard = {s} ORDER BY id LIMIT :n)"
        for s in shards
    )
    return f"SELECT id FROM ({per_shard}) ORDER BY id LIMIT :n"


def put_rows(conn: sqlite3.Connection, items: Iterable[RefItem], now: float) -> list[bool]:
    """Insert refs inside the caller's transaction. A key already present is left alone (idempotent put),
    unless its features were LOST: then the new handle revives it as PENDING. A compacted key is refused by
    the schema (trigger refs_put_compacted), whoever inserts it."""
    new = []
    for item in items:
        row = conn.execute(
            f"""INSERT INTO refs(key, shard, state, store, handle, nbytes, task_id, created_at)
                VALUES (:key, :shard, {RefState.PENDING:d}, :store, :handle, :nbytes, :task_id, :now)
                ON CONFLICT(key) DO UPDATE SET
                    state = {RefState.PENDING:d}, store = excluded.store, handle = excluded.handle,
                    nbytes = excluded.nbytes, task_id = excluded.task_id, attempts = 0, lease_token = NULL
                WHERE refs.state = {RefState.LOST:d}
                RETURNING id""",
            {
                "key": item.key,
                "shard": shard_of(item.key),
                "store": item.store,
                "handle": json.dumps(item.handle),
                "nbytes": item.nbytes,
                "task_id": item.task_id,
                "now": now,
            },
        ).fetchone()
        new.append(row is not None)
    return new


def mark_trained_rows(conn: sqlite3.Connection, ref_ids: Iterable[int], checkpoint_id: int) -> int:
    """Inside the caller's transaction: ACKED refs among `ref_ids` become TRAINED by that checkpoint."""
    return conn.execute(
        f"""UPDATE refs SET state = {RefState.TRAINED:d}, checkpoint_id = :cid
            WHERE state = {RefState.ACKED:d} AND id IN (SELECT value FROM json_each(:ids))""",
        {"cid": checkpoint_id, "ids": json.dumps(list(ref_ids))},
    ).rowcount


def _lease_of(row: sqlite3.Row) -> Lease:
    return Lease(
        id=row["id"],
        key=row["key"],
        token=row["lease_token"],
        handle=json.loads(row["handle"]),
        nbytes=row["nbytes"],
        store=row["store"],
        attempts=row["attempts"],
        deadline=row["lease_deadline"],
        task_id=row["task_id"],
    )


class RefQueue:
    def __init__(self, conn: sqlite3.Connection, max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.conn = conn
        self.max_attempts = max_attempts

    def put(self, item: RefItem) -> bool:
        return self.put_many([item])[0]

    def put_many(self, items: list[RefItem]) -> list[bool]:
        with immediate(self.conn):
            return put_rows(self.conn, items, clock.now())

    def lease(self, owner: str, n: int = 1, ttl: float = 60.0, partition: tuple[int, int] = (0, 1)) -> list[Lease]:
        """Claim up to n refs. Rank r of world w takes its own shard first, then anything pending, so it
        never idles while the global pool has work (and a change of world size needs no migration).
        `owner` names this process incarnation: its own leases are renewed first, never reclaimed."""
        rank, world = partition
        if not 0 <= rank < world:
            raise ValueError(f"partition rank {rank} is not in [0, {world})")
        now = clock.now()
        with immediate(self.conn):
            leases.renew_owned(self.conn, "refs", owner, now + ttl)
            leases.reclaim_expired(self.conn, "refs", now, except_owner=owner)
            rows = []
            own = own_shards_query(rank, world) if world > 1 else None
            if own is not None:
                rows = leases.claim(self.conn, "refs", owner, n, now + ttl, own)
            if len(rows) < n:
                rows += leases.claim(self.conn, "refs", owner, n - len(rows), now + ttl)
        return [_lease_of(r) for r in rows]

    def ack(self, tokens: list[str]) -> list[str]:
        """Mark leased refs ACKED; returns the tokens that were not acked because the lease is not yours.

        The token is cleared like every other way out of LEASED, so the token index holds live leases only;
        left set, it grew with every ref ever acked and each claim scattered its new tokens over all of it."""
        params = {"now": clock.now(), "tokens": json.dumps(list(tokens))}
        held = f"state = {RefState.LEASED:d} AND lease_token IN (SELECT value FROM json_each(:tokens))"
        with immediate(self.conn):
            done = self.conn.execute(f"SELECT lease_token FROM refs WHERE {held}", params).fetchall()
            self.conn.execute(
                f"UPDATE refs SET state = {RefState.ACKED:d}, acked_at = :now, lease_token = NULL WHERE {held}", params
            )
        return sorted(set(tokens) - {r[0] for r in done})

    def fail(self, token: str, error: str, retryable: bool = True) -> bool:
        with immediate(self.conn):
            return leases.fail(self.conn, "refs", token, error, retryable, self.max_attempts)

    def extend(self, tokens: list[str], ttl: float) -> list[str]:
        with immediate(self.conn):
            return leases.extend(self.conn, "refs", tokens, clock.now() + ttl)

    def release(self, tokens: list[str], reason: str) -> list[str]:
        """Give leases back untried (the holder stops); not a failure. Returns the tokens no longer held."""
        with immediate(self.conn):
            return leases.release(self.conn, "refs", tokens, reason)

    def release_owners(self, owner_prefix: str, keep_owner: str, reason: str) -> int:
        """Leases of earlier incarnations (`owner_prefix...`, not `keep_owner`) that the caller proved dead."""
        with immediate(self.conn):
            return leases.release_owners(self.conn, "refs", owner_prefix, keep_owner, reason)

    def reclaim(self) -> int:
        with immediate(self.conn):
            return leases.reclaim_expired(self.conn, "refs", clock.now())

    def lease_deadlines(self) -> dict[str, float]:
        """Owner -> latest deadline of the leases it holds (for a restarted trainer's wait)."""
        rows = self.conn.execute(
            f"SELECT lease_owner, max(lease_deadline) FROM refs WHERE state = {RefState.LEASED:d} GROUP BY lease_owner"
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def mark_lost(self, token: str, error: str) -> bool:
        """The features behind a lease cannot be read: the ref is LOST and its prompt goes back to the rollout."""
        with immediate(self.conn):
            row = self.conn.execute(
                f"""UPDATE refs SET state = {RefState.LOST:d}, last_error = :error, lease_token = NULL
                    WHERE lease_token = :token AND state = {RefState.LEASED:d} RETURNING task_id""",
                {"token": token, "error": error},
            ).fetchone()
            if row is not None:
                task_rows.requeue_rows(self.conn, [row[0]])
        return row is not None

    def lose_store(self, store: str, error: str) -> int:
        """Every live ref of a store whose memory is gone (e.g. its arena vanished) becomes LOST."""
        with immediate(self.conn):
            rows = self.conn.execute(
                f"""UPDATE refs SET state = {RefState.LOST:d}, last_error = :error, lease_token = NULL
                    WHERE store = :store AND state IN ({RefState.PENDING:d}, {RefState.LEASED:d}) RETURNING task_id""",
                {"store": store, "error": error},
            ).fetchall()
            task_rows.requeue_rows(self.conn, [r[0] for r in rows])
        return len(rows)

    def acked(self) -> list[AckedRef]:
        """Refs acked after the last durable checkpoint (they never counted), in id order."""
        rows = self.conn.execute(f"SELECT id, handle FROM refs WHERE state = {RefState.ACKED:d} ORDER BY id").fetchall()
        return [AckedRef(id=r["id"], handle=json.loads(r["handle"])) for r in rows]

    def put_back(self, requeue_ids: list[int], lost_ids: list[int]) -> tuple[int, int]:
        """Trainer restart, after it looked at `acked()`: refs whose features survive go back to PENDING, the
        others are LOST and their prompts re-queued. Fenced on the rows still being ACKED. (requeued, lost)."""
        acked = f"state = {RefState.ACKED:d} AND id IN (SELECT value FROM json_each(:ids))"
        with immediate(self.conn):
            requeued = self.conn.execute(
                # attempts reset: these were trained fine; only the checkpoint holding them was lost.
                f"""UPDATE refs SET state = {RefState.PENDING:d}, lease_token = NULL, acked_at = NULL, attempts = 0
                    WHERE {acked}""",
                {"ids": json.dumps(list(requeue_ids))},
            ).rowcount
            gone = self.conn.execute(
                f"""UPDATE refs SET state = {RefState.LOST:d}, lease_token = NULL, acked_at = NULL,
                    last_error = 'acked after the last durable checkpoint; features already freed'
                    WHERE {acked} RETURNING task_id""",
                {"ids": json.dumps(list(lost_ids))},
            ).fetchall()
            task_rows.requeue_rows(self.conn, [r[0] for r in gone])
        return requeued, len(gone)

    def live_handles(self, store: str) -> list[dict]:
        rows = self.conn.execute(
            f"SELECT handle FROM refs WHERE store = :store AND state IN ({RefState.PENDING:d}, {RefState.LEASED:d})",
            {"store": store},
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def live_bytes(self, store: str | None = None) -> int:
        """Feature bytes of PENDING and LEASED refs (of one store, or all), from trigger-kept counters."""
        if store is not None:
            row = self.conn.execute("SELECT live FROM store_bytes WHERE store = :store", {"store": store}).fetchone()
            return 0 if row is None else row[0]
        return self.conn.execute(
            f"""SELECT coalesce(sum(bytes), 0) FROM counts
                WHERE tbl = 'refs' AND state IN ({RefState.PENDING:d}, {RefState.LEASED:d})"""
        ).fetchone()[0]

    def counts(self) -> dict[str, int]:
        return leases.counts(self.conn, "refs", RefState)

    def oldest_pending_created_at(self) -> float | None:
        """Creation time of the next ref in line (the lowest pending id: one index seek)."""
        row = self.conn.execute(
            f"SELECT created_at FROM refs WHERE state = {RefState.PENDING:d} ORDER BY id LIMIT 1"
        ).fetchone()
        return None if row is None else row[0]

    def rate(self, column: str, *, since: float, now: float, most: int = RATE_SAMPLE) -> float:
        """Events per second since `since`, from a timestamp column (created_at or acked_at; both indexed),
        over at most the `most` latest events, so the cost stays bounded however fast the run goes."""
        if column not in ("created_at", "acked_at"):
            raise ValueError(f"no rate over refs.{column}")
        first, count = self.conn.execute(
            f"""SELECT min(t), count(*) FROM (SELECT {column} AS t FROM refs WHERE {column} >= :since
                ORDER BY {column} DESC LIMIT :most)""",
            {"since": since, "most": most},
        ).fetchone()
        return count / max(now - first, 1.0) if count else 0.0

    def handles_by_key(self, keys: list[str]) -> dict[str, tuple[dict | None, RefState]]:
        """Key -> (handle, state) of those keys that are known; a compacted key is (None, TRAINED)."""
        rows = self.conn.execute(
            f"""SELECT key, handle, state FROM refs WHERE key IN (SELECT value FROM json_each(:keys))
                UNION ALL
                SELECT key, NULL, {RefState.TRAINED:d} FROM compacted_refs WHERE key IN (SELECT value FROM json_each(:keys))""",
            {"keys": json.dumps(keys)},
        ).fetchall()
        return {r["key"]: (r["handle"] and json.loads(r["handle"]), RefState(r["state"])) for r in rows}

    def handles_with_state(self, store: str) -> list[tuple[dict, RefState]]:
        """Every ref of a store, whatever its state (gc decides which files are still needed)."""
        rows = self.conn.execute("SELECT handle, state FROM refs WHERE store = :store", {"store": store}).fetchall()
        return [(json.loads(r["handle"]), RefState(r["state"])) for r in rows]

    def consumed_items(self, *, without: str) -> list[RefItem]:
        """ACKED or TRAINED refs whose key does not contain `without`, in id order, as puttable items."""
        rows = self.conn.execute(
            f"""SELECT key, handle, nbytes, store, task_id FROM refs
                WHERE state IN ({RefState.ACKED:d}, {RefState.TRAINED:d}) AND instr(key, :without) = 0 ORDER BY id""",
            {"without": without},
        ).fetchall()
        return [RefItem(key=r["key"], handle=json.loads(r["handle"]), nbytes=r["nbytes"], store=r["store"],
                        task_id=r["task_id"]) for r in rows]

    def keys_containing(self, part: str) -> set[str]:
        """Every known key with `part` in it, compacted ones included (a scan: for a drained stream's replay)."""
        rows = self.conn.execute(
            """SELECT key FROM refs WHERE instr(key, :part) > 0
               UNION ALL SELECT key FROM compacted_refs WHERE instr(key, :part) > 0""",
            {"part": part},
        )
        return {r[0] for r in rows}

    def compacted_keys(self, *, without: str) -> list[str]:
        """Keys of compacted refs that do not contain `without`: trained, and their features not kept for a replay."""
        rows = self.conn.execute("SELECT key FROM compacted_refs WHERE instr(key, :without) = 0", {"without": without})
        return [r[0] for r in rows]

    def compact(self, *, through_checkpoint: int, replay_stores: Collection[str] = (), limit: int = COMPACT_BATCH) -> Compaction:
        """One bounded step: up to `limit` TRAINED refs of checkpoints up to `through_checkpoint`, in the order
        checkpoints made them, become bare keys in compacted_refs, and their rows go. Every TRAINED ref is
        covered by a recorded checkpoint (invariant 5), so a trainer restart never puts one back; the key alone
        keeps a re-put refused; counts keep it as TRAINED. Kept: first-epoch refs (no EPOCH_MARK in the key) of
        `replay_stores`, the stores whose features outlive an ack (files), since `train --epochs` replays them
        from their handles and gc keeps the files that rows name. A done prompt task whose refs are all
        compacted keeps its key but not its payload (tasks.forget_payloads). Call until `examined < limit`."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        with immediate(self.conn):
            after_checkpoint, after_id = self.conn.execute("SELECT checkpoint_id, ref_id FROM compaction_cursor").fetchone()
            rows = self.conn.execute(TRAINED_AFTER_CURSOR, {
                "checkpoint": after_checkpoint, "id": after_id, "through": through_checkpoint, "limit": limit,
            }).fetchall()
            rows = sorted(rows, key=lambda r: (r["checkpoint_id"], r["id"]))[:limit]
            gone = [r for r in rows if r["store"] not in replay_stores or EPOCH_MARK in r["key"]]
            # the keys first: the delete trigger sees them and keeps the rows counted as TRAINED
            self.conn.execute("INSERT INTO compacted_refs(key) SELECT value FROM json_each(:keys)",
                              {"keys": json.dumps([r["key"] for r in gone])})
            self.conn.execute("DELETE FROM refs WHERE id IN (SELECT value FROM json_each(:ids))",
                              {"ids": json.dumps([r["id"] for r in gone])})
            task_rows.forget_payloads(self.conn, [r["task_id"] for r in gone])
            if rows:
                self.conn.execute("UPDATE compaction_cursor SET checkpoint_id = :checkpoint, ref_id = :id",
                                  {"checkpoint": rows[-1]["checkpoint_id"], "id": rows[-1]["id"]})
        return Compaction(examined=len(rows), compacted=len(gone))

    def compacted(self) -> int:
        """How many refs compaction has turned into bare keys (a trigger-kept counter)."""
        row = self.conn.execute("SELECT rows FROM counts WHERE tbl = 'compacted_refs'").fetchone()
        return 0 if row is None else row[0]

    def depth(self) -> int:
        return self.counts()["pending"]

    def in_flight(self) -> int:
        return self.counts()["leased"]

    def dead(self, limit: int = 100) -> list[leases.Dead]:
        return leases.dead(self.conn, "refs", limit)

    def requeue_dead(self, ids: list[int] | None = None) -> int:
        """Give dead refs a fresh set of attempts (all of them, or those ids)."""
        with immediate(self.conn):
            return leases.requeue_dead(self.conn, "refs", ids)
