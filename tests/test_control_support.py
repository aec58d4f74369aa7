"""Worker processes and helpers for the control-plane tests (no tests here).

Workers are top-level functions so `multiprocessing` spawn children can import them; each opens its own
connection (a SQLite connection never crosses a process boundary) and reports through the database or
a file, never through shared Python state.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.control.tasks import TaskQueue

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT_S = 120.0  # generous: the machine is shared; a hang still fails instead of blocking CI


def item(key: str, store: str = "shm", task_id: int | None = None) -> RefItem:
    return RefItem(key=key, handle={"key": key, "offset": 0}, nbytes=100, store=store, task_id=task_id)


def produce(db: str, keys: list[str], batch: int) -> None:
    """Put the keys in batches, then mark end of stream."""
    conn = connect(db)
    queue = RefQueue(conn)
    for start in range(0, len(keys), batch):
        queue.put_many([item(k) for k in keys[start : start + batch]])
    RunMeta(conn).set_end_of_stream()
    conn.close()


def produce_twice(db: str, keys: list[str], batch: int) -> None:
    """Put the keys in batches; once some trained refs are compacted, put them all again (a rollout restarted
    from scratch), then mark end of stream."""
    conn = connect(db)
    queue = RefQueue(conn)
    for again in (False, True):
        if again:
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while queue.compacted() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
        for start in range(0, len(keys), batch):
            queue.put_many([item(k) for k in keys[start : start + batch]])
    RunMeta(conn).set_end_of_stream()
    conn.close()


def compacting_consumer(db: str, out: str, batch: int) -> None:
    """Lease and ack until end of stream and an empty queue, appending each round's acked keys to `out`
    (JSONL); every few rounds record a checkpoint of what it acked and compact, as the trainer does (without
    waiting out the rate window)."""
    conn = connect(db)
    queue, meta = RefQueue(conn), RunMeta(conn)
    uncovered, rounds = [], 0
    with open(out, "a") as f:
        while True:
            eos = meta.end_of_stream()  # read before leasing: nothing can be put after it is set
            leases = queue.lease("consumer", n=batch, ttl=60.0)
            if not leases:
                if eos and queue.in_flight() == 0:
                    break
                time.sleep(0.005)
                continue
            refused = set(queue.ack([lease.token for lease in leases]))
            acked = [lease for lease in leases if lease.token not in refused]
            f.write(json.dumps([lease.key for lease in acked]) + "\n")
            f.flush()
            uncovered += [lease.id for lease in acked]
            rounds += 1
            if rounds % 5 == 0:
                meta.record_checkpoint(rounds, "ckpt", uncovered)
                uncovered = []
                while queue.compact(through_checkpoint=meta.last_checkpoint().id, limit=50).examined == 50:
                    pass
    meta.record_checkpoint(rounds, "ckpt", uncovered)
    conn.close()


def consume(db: str, owner: str, out: str, batch: int, partition: tuple[int, int] = (0, 1)) -> None:
    """Lease and ack until end of stream and an empty queue; append every key it acked to `out` (JSONL)."""
    conn = connect(db)
    queue, meta = RefQueue(conn), RunMeta(conn)
    with open(out, "a") as f:
        while True:
            eos = meta.end_of_stream()  # read before leasing: nothing can be put after it is set
            leases = queue.lease(owner, n=batch, ttl=60.0, partition=partition)
            if not leases:
                if eos and queue.in_flight() == 0:
                    break
                time.sleep(0.005)
                continue
            refused = queue.ack([lease.token for lease in leases])
            acked = [lease.key for lease in leases if lease.token not in refused]
            f.write(json.dumps({"owner": owner, "keys": acked, "refused": len(refused)}) + "\n")
            f.flush()
    conn.close()


def consume_limit(db: str, owner: str, out: str, batch: int, limit: int, partition: tuple[int, int]) -> None:
    """Lease and ack at most `limit` refs, writing (key, shard-is-mine) per lease round to `out`."""
    conn = connect(db)
    queue = RefQueue(conn)
    done = 0
    with open(out, "a") as f:
        while done < limit:
            leases = queue.lease(owner, n=min(batch, limit - done), ttl=60.0, partition=partition)
            if not leases:
                break
            refused = queue.ack([lease.token for lease in leases])
            if refused:
                raise RuntimeError(f"{owner}: acks refused for {refused}")
            f.write(json.dumps({"owner": owner, "keys": [lease.key for lease in leases]}) + "\n")
            f.flush()
            done += len(leases)
    conn.close()


def lease_and_hang(db: str, owner: str, n: int, ttl: float, out: str, queue: str = "refs") -> None:
    """Lease n refs (a consumer stuck mid-step) or n prompt tasks (queue="tasks": a rollout stuck mid-batch),
    publish the tokens, then hang until killed."""
    conn = connect(db)
    leases = (RefQueue if queue == "refs" else TaskQueue)(conn).lease(owner, n=n, ttl=ttl)
    publish(out, {"tokens": [lease.token for lease in leases], "keys": [lease.key for lease in leases]})
    while True:
        time.sleep(1.0)


def lease_wait_ack(db: str, owner: str, n: int, ttl: float, out: str, go: str) -> None:
    """A slow consumer: lease n refs, publish the tokens, wait for `go`, then ack and report what was refused."""
    conn = connect(db)
    queue = RefQueue(conn)
    leases = queue.lease(owner, n=n, ttl=ttl)
    publish(out, {"tokens": [lease.token for lease in leases]})
    while not Path(go).exists():
        time.sleep(0.01)
    publish(out + ".acked", {"refused": queue.ack([lease.token for lease in leases])})
    conn.close()


def connect_together(dbs: list[str], barrier, out: str) -> None:
    """For each new database in turn: meet the other workers at the barrier, then all open it at once."""
    run_ids = []
    for db in dbs:
        barrier.wait(JOIN_TIMEOUT_S)
        conn = connect(db)
        run_ids.append(RunMeta(conn).run_id)
        conn.close()
    publish(out, {"run_ids": run_ids})


def lease_across_a_clock_jump(db: str, owner: str, ttl: float, jump: float, out: str) -> None:
    """Lease one ref, let the injected wall clock jump by `jump` seconds (NTP step, VM resume), lease again;
    publish both leases' keys and the tokens the final ack refused."""
    real_time, offset = time.time, [0.0]
    time.time = lambda: real_time() + offset[0]  # the clock every control-plane call of this process reads
    queue = RefQueue(connect(db))
    (first,) = queue.lease(owner, n=1, ttl=ttl)
    offset[0] = jump
    second = queue.lease(owner, n=1, ttl=ttl)
    refused = queue.ack([first.token] + [lease.token for lease in second])
    publish(out, {"keys": [first.key] + [lease.key for lease in second], "refused": refused})


def write_forever(db: str, ready: str) -> None:
    """Put refs in small committed batches until killed; touches `ready` once the first batch is durable."""
    conn = connect(db)
    queue = RefQueue(conn)
    i = 0
    while True:
        queue.put_many([item(f"w{i + j}") for j in range(10)])
        i += 10
        if i == 10:
            publish(ready, {"first_batch": True})


def publish(path: str, value: dict) -> None:
    """Write JSON then rename, so the test never reads half a file."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


def read_published(path: Path, timeout: float = JOIN_TIMEOUT_S) -> dict:
    wait_for(path, timeout)
    return json.loads(path.read_text())


def read_acked(out: Path) -> list[str]:
    """Every key acked, over all consumers, in the order written (duplicates kept)."""
    if not out.exists():
        return []
    return [key for line in out.read_text().splitlines() for key in json.loads(line)["keys"]]


def run_all(processes: list) -> None:
    """Start, join with a timeout, and fail loudly on a crash or a hang."""
    for p in processes:
        p.start()
    for p in processes:
        p.join(JOIN_TIMEOUT_S)
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"worker {p.name} did not finish in {JOIN_TIMEOUT_S} s")
        if p.exitcode != 0:
            raise AssertionError(f"worker {p.name} exited with {p.exitcode}")


def wait_for(path: Path, timeout: float = JOIN_TIMEOUT_S) -> None:
    """Wait for a file a worker writes when it reached a point (no timing assertion: a hang fails)."""
    from conftest import wait_until  # here, not at the top: spawned workers import this module, not pytest's

    wait_until(lambda: path.exists() and path.stat().st_size > 0, f"a worker writes {path}", timeout=timeout,
               every=0.01)
