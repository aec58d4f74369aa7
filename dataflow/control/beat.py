"""Heartbeats and lease extensions from a side thread while a process is busy in one long phase.

A rollout's forward or a trainer's step (its first one compiles, for minutes at low priority beside a busy
rollout) can outlast both the heartbeat's staleness limit and the leases it holds: the process would look
dead to `status` and to its peer, and a lapsed ref lease would train twice. torch releases the GIL, so a
thread can keep both fresh. It opens its own connection only once the phase outlives one beat, so a short
phase (a GPU step) costs a thread start and nothing in the database.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta

HEARTBEAT_EVERY_S = 2.0  # well inside meta.STALE_AFTER_S


@contextmanager
def thread_control(source: str | tuple, queue_type: type):
    """(meta, queue) for a helper thread: on a connection of its own to the database at `source`, or
    `source` itself when it is such a pair already (Ray mode: ledger proxies, safe to share)."""
    if not isinstance(source, str):
        yield source
        return
    conn = connect(source, allow_network_fs=True)  # the caller's own connection to it passed that check
    try:
        yield RunMeta(conn), queue_type(conn)
    finally:
        conn.close()


@contextmanager
def beating_during(
    source: str | tuple, queue_type: type, process_id: str, role: str, status: str, info: dict,
    tokens: list[str] = (), ttl: float = 0.0,
) -> Iterator[set[str]]:
    """Heartbeat as `process_id` (and keep the leases `tokens` of `queue_type` -- TaskQueue or RefQueue --
    for `ttl`) from a thread while the caller is in a long phase. Yields the set of tokens an extension found
    no longer ours (filled in as the phase runs); the caller drops their work."""
    stop, lost = threading.Event(), set()
    every = min(HEARTBEAT_EVERY_S, ttl / 4) if tokens else HEARTBEAT_EVERY_S

    def beat() -> None:
        if stop.wait(every):
            return
        with thread_control(source, queue_type) as (meta, queue):
            while True:
                meta.heartbeat(process_id, role, status, info)
                if tokens:
                    lost.update(queue.extend([t for t in tokens if t not in lost], ttl))
                if stop.wait(every):
                    return

    thread = threading.Thread(target=beat, name=f"{role}-heartbeat", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
