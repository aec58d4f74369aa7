"""A point-in-time view of a run, read in one short read transaction (no lock held afterwards)."""

from __future__ import annotations

import sqlite3

from dataflow.control import clock
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RATE_WINDOW_S, RefQueue
from dataflow.control.tasks import TaskQueue


def snapshot(conn: sqlite3.Connection) -> dict:
    now = clock.now()
    meta, refs, tasks = RunMeta(conn), RefQueue(conn), TaskQueue(conn)
    conn.execute("BEGIN")  # one consistent read; ended right below so no reader pins the WAL
    try:
        ref_counts = refs.counts()  # compacted refs still count as trained
        compacted = refs.compacted()
        task_counts = tasks.counts()
        oldest = refs.oldest_pending_created_at()
        produced_per_s = refs.rate("created_at", since=now - RATE_WINDOW_S, now=now)
        acked_per_s = refs.rate("acked_at", since=now - RATE_WINDOW_S, now=now)
        checkpoint = meta.last_checkpoint()
        processes = meta.processes()
        in_flight_bytes = refs.live_bytes()
        run_id, end_of_stream, run_finished = meta.run_id, meta.end_of_stream(), meta.run_finished()
    finally:
        conn.execute("COMMIT")
    remaining = task_counts["pending"] + task_counts["leased"] + ref_counts["pending"] + ref_counts["leased"]
    return {
        "run_id": run_id,
        "refs": ref_counts,
        "compacted_refs": compacted,
        "tasks": task_counts,
        "in_flight_bytes": in_flight_bytes,
        "oldest_pending_age_s": None if oldest is None else round(now - oldest, 3),
        "produced_per_s": round(produced_per_s, 3),
        "acked_per_s": round(acked_per_s, 3),
        "eta_s": round(remaining / acked_per_s, 1) if acked_per_s > 0 else None,
        "dead": ref_counts["dead"] + task_counts["dead"],
        "end_of_stream": end_of_stream,
        "run_finished": run_finished,
        "last_checkpoint": None
        if checkpoint is None
        else {"step": checkpoint.step, "path": checkpoint.path, "age_s": round(now - checkpoint.created_at, 1)},
        "processes": [
            {
                "id": p.id,
                "role": p.role,
                "pid": p.pid,
                "host": p.host,
                "alive": p.alive(now),
                "last_seen_s": round(now - p.heartbeat_at, 1),
                "status": p.status,
                "info": p.info,
            }
            for p in processes
        ],
    }
