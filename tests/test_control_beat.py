"""The side-thread heartbeat that keeps a busy process alive and its leases held (control/beat.py)."""

import time

import pytest
from conftest import wait_until
from test_control_support import item

from dataflow.control.beat import HEARTBEAT_EVERY_S, beating_during
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue


def lease_one(conn, queue_type):
    queue = queue_type(conn)
    if queue_type is TaskQueue:
        queue.add_many([("k", {})])
    else:
        queue.put(item("k"))
    [lease] = queue.lease("me", ttl=4.0)
    return queue, lease


def deadline(conn, queue_type) -> float:
    table = "tasks" if queue_type is TaskQueue else "refs"
    return conn.execute(f"SELECT lease_deadline FROM {table}").fetchone()[0]


@pytest.mark.parametrize("queue_type", [TaskQueue, RefQueue])
def test_a_long_phase_keeps_the_heartbeat_and_the_leases_fresh(tmp_path, queue_type):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    queue, lease = lease_one(conn, queue_type)
    first = deadline(conn, queue_type)
    with beating_during(str(db), queue_type, "x-0", "train", "busy", {"step": 3}, [lease.token], ttl=4.0) as lost:
        # the main thread is busy (stands for a forward or a step); the beat and the extension come from the side
        wait_until(lambda: deadline(conn, queue_type) != first, "the side thread extends the lease", every=0.1)
    [process] = RunMeta(conn).processes("train")
    assert process.id == "x-0" and process.status == "busy" and process.info == {"step": 3}
    assert not lost
    if queue_type is TaskQueue:
        assert queue.complete(lease.token)  # still ours
    else:
        assert queue.ack([lease.token]) == []  # nothing stale


def test_a_lease_taken_from_us_is_reported_lost(tmp_path):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    queue, lease = lease_one(conn, RefQueue)
    with beating_during(str(db), RefQueue, "x-0", "train", "busy", {}, [lease.token], ttl=0.4) as lost:
        queue.mark_lost(lease.token, "bytes gone")
        wait_until(lambda: lease.token in lost, "the extension finds the lease gone", every=0.05)


def test_a_short_phase_writes_nothing(tmp_path):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    started = time.monotonic()
    with beating_during(str(db), RefQueue, "x-0", "train", "busy", {}):
        pass
    assert time.monotonic() - started < HEARTBEAT_EVERY_S  # the thread stops at once, not after a beat
    assert RunMeta(conn).processes("train") == []
