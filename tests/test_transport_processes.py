"""The data plane across real processes: a producer and a consumer that share only the run database
and /dev/shm, with kill -9 on either side."""

import os
import signal

from conftest import leftover_segments, wait_until
from test_transport_support import consume, matches, produce, sample, spawn, tokens_for

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.transport import open_reader, open_writer, sweep
from dataflow.transport.arena import plan_layout

LARGEST = plan_layout(sample("x", 32))[1]


def test_a_consumer_reads_every_sample_intact_while_the_producer_wraps_the_arena_many_times(conn, run_db):
    keys = [f"s{i}" for i in range(80)]
    producer = spawn(produce, run_db, "p0", keys, 4 * LARGEST)  # ~4 samples in flight: ~20 wrap-arounds
    consumer = spawn(consume, run_db, len(keys), batch=3, seed=1)
    producer.join(120)
    consumer.join(120)
    assert (producer.exitcode, consumer.exitcode) == (0, 0)
    assert RefQueue(conn).counts()["acked"] == len(keys)
    segments = leftover_segments(RunMeta(conn).run_id)
    assert len(segments) == 1  # the consumer's exit did not unlink it (no resource_tracker)
    assert sweep(conn).removed_segments == [segments[0].name]


def test_killing_the_producer_leaves_the_consumers_views_intact_and_a_restart_rebuilds_the_allocator(conn, run_db):
    queue, reader = RefQueue(conn), open_reader(conn)
    first = [f"a{i}" for i in range(3)]
    producer = spawn(produce, run_db, "p0", first, 4 * LARGEST, hang=True)
    wait_until(lambda: queue.depth() == 3, "the producer committed 3 samples", timeout=60, process=producer, every=0.02)
    leases = queue.lease("t", n=3)
    views = {lease.key: reader.open(lease.handle) for lease in leases}
    os.kill(producer.pid, signal.SIGKILL)
    producer.join(10)
    assert all(matches(k, v, tokens_for(k)) for k, v in views.items())
    second = [f"b{i}" for i in range(6)]
    restarted = spawn(produce, run_db, "p0", second, 4 * LARGEST)  # must write around the 3 leased samples
    # once it waits for room (or wrote all), every byte it could write is written
    wait_until(lambda: RunMeta(conn).get("waiting.p0") is not None or queue.depth() == len(second),
               "the restarted producer waits for room or wrote all", timeout=60, every=0.02)
    assert all(matches(k, v, tokens_for(k)) for k, v in views.items())
    queue.ack([lease.token for lease in leases])  # frees room for the rest of the restarted producer's samples
    acked = []

    def acked_all() -> bool:
        for lease in queue.lease("t", n=2):
            assert matches(lease.key, reader.open(lease.handle), tokens_for(lease.key))
            assert not queue.ack([lease.token])
            acked.append(lease.key)
        return len(acked) >= len(second)

    wait_until(acked_all, "every sample of the restarted producer is acked", timeout=60, every=0.02)
    restarted.join(60)
    assert restarted.exitcode == 0
    reader.close()
    assert len(sweep(conn).removed_segments) == 1


def test_killing_the_consumer_returns_its_ranges_once_its_leases_expire(conn, run_db):
    queue = RefQueue(conn)
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=3 * LARGEST)
    keys = [f"s{i}" for i in range(3)]
    for key in keys:
        handle, nbytes = writer.write(key, sample(key, tokens_for(key)))
        queue.put(RefItem(key, handle, nbytes, handle["store"]))
    consumer = spawn(consume, run_db, 3, batch=3, hold=True)  # leases all three (ttl 1 s), maps them, hangs
    wait_until(lambda: queue.in_flight() == 3, "the consumer leased all three", timeout=60, process=consumer, every=0.02)
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.join(10)
    reader, recovered = open_reader(conn), []

    def second_consumer(waited):  # runs while the producer waits for room
        for lease in queue.lease("t2", n=3):  # expired leases come back here
            assert matches(lease.key, reader.open(lease.handle), tokens_for(lease.key))
            assert not queue.ack([lease.token])
            recovered.append(lease.key)

    writer.write("next", sample("next", 32), on_wait=second_consumer)
    assert sorted(recovered) == keys
    reader.close()
    writer.close()
