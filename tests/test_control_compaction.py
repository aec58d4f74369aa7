"""Compaction: trained refs become bare keys, and nothing that status, dead letters, exactly-once, the trainer's
put-back or epoch replay needs goes with their rows."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control import clock
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import TRAINED_AFTER_CURSOR, RefItem, RefQueue, RefState
from dataflow.control.status import snapshot
from dataflow.control.tasks import TaskQueue
from dataflow.errors import InputError
from dataflow.train.epochs import replay_epochs
from dataflow.transport.gc import compact_trained
from test_control_support import SPAWN, JOIN_TIMEOUT_S, compacting_consumer, item, produce_twice

EVERY = 1 << 62  # a checkpoint id past every checkpoint: compaction may take every trained ref


@pytest.fixture
def conn(tmp_path):
    connection = connect(tmp_path / "run.sqlite")
    yield connection
    connection.close()


def train(conn, keys: list[str]) -> None:
    """Ack exactly these (pending) refs and record a checkpoint that makes them TRAINED."""
    queue, wanted = RefQueue(conn), set(keys)
    leases = queue.lease("trainer", n=100_000)
    queue.release([x.token for x in leases if x.key not in wanted], "not this round")
    mine = [x for x in leases if x.key in wanted]
    assert len(mine) == len(wanted) and not queue.ack([x.token for x in mine])
    RunMeta(conn).record_checkpoint(1, "ckpt", [x.id for x in mine])


def compact_all(queue: RefQueue, **kwargs) -> int:
    compacted = 0
    while True:
        step = queue.compact(through_checkpoint=EVERY, limit=7, **kwargs)
        compacted += step.compacted
        if step.examined < 7:
            return compacted


def rows(conn) -> int:
    return conn.execute("SELECT count(*) FROM refs").fetchone()[0]


def test_trained_refs_become_bare_keys_and_every_total_status_shows_stays(conn):
    queue = RefQueue(conn)
    queue.put_many([item(f"k{i}") for i in range(50)])
    train(conn, [f"k{i}" for i in range(30)])
    (dead,) = queue.lease("t", n=1)
    queue.fail(dead.token, "boom", retryable=False)
    before = snapshot(conn)
    assert compact_all(queue) == 30
    after = snapshot(conn)
    assert after["refs"] == before["refs"] == {"pending": 19, "leased": 0, "acked": 0, "trained": 30, "dead": 1,
                                                "lost": 0}
    assert after["in_flight_bytes"] == before["in_flight_bytes"] == 19 * 100
    assert (before["compacted_refs"], after["compacted_refs"]) == (0, 30)
    assert [d.key for d in queue.dead()] == [dead.key] and rows(conn) == 20  # the dead letter keeps its row
    assert queue.compact(through_checkpoint=EVERY).examined == 0  # caught up: nothing is looked at twice


def test_a_compacted_key_is_refused_by_a_re_put_and_by_a_re_run_prompt_task(conn):
    queue, tasks = RefQueue(conn), TaskQueue(conn)
    tasks.add_many([("p0", {})])
    (task,) = tasks.lease("rollout-1")
    assert tasks.complete(task.token, [item("k0"), item("k1")])
    train(conn, ["k0"])
    assert compact_all(queue) == 1
    assert queue.put_many([item("k0"), item("k2")]) == [False, True]
    # k1's features are lost: its prompt goes back and the regenerated task puts both of its refs again
    (lease,) = queue.lease("t", n=1)
    assert lease.key == "k1" and queue.mark_lost(lease.token, "arena gone")
    (again,) = tasks.lease("rollout-2")
    assert tasks.complete(again.token, [item("k0"), item("k1")])
    assert queue.counts()["pending"] == 2 and queue.counts()["trained"] == 1  # k1 revived, k2; k0 not again
    assert queue.handles_by_key(["k0", "k1"]) == {"k0": (None, RefState.TRAINED),
                                                  "k1": (item("k1").handle, RefState.PENDING)}


def test_only_refs_of_recorded_checkpoints_older_than_the_rate_window_are_compacted(conn):
    queue, meta = RefQueue(conn), RunMeta(conn)
    queue.put_many([item(f"k{i}") for i in range(30)])
    train(conn, [f"k{i}" for i in range(10)])
    first_at = meta.last_checkpoint().created_at
    while clock.now() <= first_at:  # the second checkpoint gets a later timestamp, however coarse the clock
        pass
    train(conn, [f"k{i}" for i in range(10, 20)])
    second_at = meta.last_checkpoint().created_at
    leases = queue.lease("t", n=5)
    queue.ack([x.token for x in leases])  # acked after the last checkpoint: a restart puts these back
    assert compact_trained(queue, meta) == 0  # both checkpoints are younger than the rate window
    assert compact_trained(queue, meta, before=first_at) == 0
    assert compact_trained(queue, meta, before=(first_at + second_at) / 2) == 10  # the first checkpoint's only
    assert compact_trained(queue, meta, before=clock.now() + 1) == 10
    assert queue.put_back([a.id for a in queue.acked()], []) == (5, 0)
    assert queue.counts() == {"pending": 10, "leased": 0, "acked": 0, "trained": 20, "dead": 0, "lost": 0}


def test_first_epoch_refs_of_replay_stores_keep_their_rows_and_are_not_read_again(conn):
    queue = RefQueue(conn)
    keys = [f"f{i}" for i in range(10)] + [f"f{i}#e1" for i in range(10)] + [f"s{i}" for i in range(10)]
    queue.put_many([item(k, store="files-a" if k.startswith("f") else "shm") for k in keys])
    train(conn, keys)
    assert compact_all(queue, replay_stores=["files-a"]) == 20
    assert sorted(r.key for r in queue.consumed_items(without="#")) == sorted(f"f{i}" for i in range(10))
    cursor = conn.execute("SELECT * FROM compaction_cursor").fetchall()
    step = queue.compact(through_checkpoint=EVERY, replay_stores=["files-a"])
    assert step.examined == 0 and conn.execute("SELECT * FROM compaction_cursor").fetchall() == cursor


def test_compaction_seeks_the_trained_index_and_never_walks_or_sorts_the_table(conn):
    RefQueue(conn).put_many([item(f"k{i}") for i in range(300)])
    train(conn, [f"k{i}" for i in range(100)])
    for analyzed in (False, True):
        if analyzed:
            conn.execute("ANALYZE")
        plan = " | ".join(r["detail"] for r in conn.execute(
            "EXPLAIN QUERY PLAN " + TRAINED_AFTER_CURSOR, {"checkpoint": 1, "id": 5, "through": 1, "limit": 10}))
        assert plan.count("SEARCH refs USING INDEX refs_trained") == 2, plan
        assert "SCAN refs" not in plan and "TEMP B-TREE" not in plan, plan


class FilesOnly:
    """The reader's answer to `retained`: features outlive an ack in the files store only (transport/reader.py)."""

    def retained(self, handle: dict) -> bool:
        return handle["store"].startswith("files")


def stored(key: str, store: str) -> RefItem:
    return RefItem(key=key, handle={"key": key, "store": store}, nbytes=100, store=store)


def test_epoch_replay_after_compaction_replays_files_refs_and_refuses_freed_ones(conn):
    queue = RefQueue(conn)
    queue.put_many([stored(f"f{i}", "files-a") for i in range(6)])
    train(conn, [f"f{i}" for i in range(6)])
    assert compact_all(queue, replay_stores=["files-a"]) == 0
    assert replay_epochs(conn, FilesOnly(), epochs=2, seed=0) == 6
    train(conn, [f"f{i}#e1" for i in range(6)])
    assert compact_all(queue, replay_stores=["files-a"]) == 6  # the replayed epoch's rows go
    assert replay_epochs(conn, FilesOnly(), epochs=2, seed=0) == 0  # a restart replays nothing twice
    assert replay_epochs(conn, FilesOnly(), epochs=3, seed=0) == 6
    # arena refs: their features went at the ack; compacted, a replay still says so instead of skipping them
    queue.put_many([stored(f"s{i}", "shm") for i in range(3)])
    train(conn, [f"s{i}" for i in range(3)])
    assert compact_all(queue, replay_stores=["files-a"]) == 3
    with pytest.raises(InputError, match="freed after training"):
        replay_epochs(conn, FilesOnly(), epochs=3, seed=0)


def test_dataflow_gc_compacts_and_reports_it(tmp_path, monkeypatch):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    RefQueue(conn).put_many([item(f"k{i}") for i in range(12)])
    train(conn, [f"k{i}" for i in range(12)])
    conn.execute("UPDATE checkpoints SET created_at = created_at - 3600")  # an hour old: out of the rate window
    done = CliRunner().invoke(app, ["gc", "--db", str(db), "--dry-run", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["compacted_refs"] == 0 and rows(conn) == 12
    done = CliRunner().invoke(app, ["gc", "--db", str(db)])
    assert done.exit_code == 0 and "compacted 12 trained refs" in done.output, done.output
    assert rows(conn) == 0 and RefQueue(conn).counts()["trained"] == 12


def test_compaction_racing_a_restarted_producer_and_a_consumer_trains_every_key_once(tmp_path):
    """A producer puts every key, then puts them all again (a rollout restarted from scratch), while a consumer
    leases, acks, checkpoints and compacts as it goes: every key is acked exactly once."""
    db, out = str(tmp_path / "run.sqlite"), str(tmp_path / "acked.jsonl")
    connect(db).close()
    keys = [f"k{i:04d}" for i in range(1500)]
    workers = [SPAWN.Process(target=produce_twice, args=(db, keys, 50)),
               SPAWN.Process(target=compacting_consumer, args=(db, out, 20))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(JOIN_TIMEOUT_S)
        assert w.exitcode == 0
    acked = [k for line in open(out) for k in json.loads(line)]
    assert sorted(acked) == keys  # each key once: no re-put of a compacted key came back
    queue = RefQueue(connect(db))
    assert queue.counts()["trained"] == len(keys) and queue.compacted() > len(keys) // 2


def test_a_done_task_whose_refs_are_all_compacted_keeps_its_key_but_not_its_prompt(conn):
    queue, tasks = RefQueue(conn), TaskQueue(conn)
    prompt = {"id": "p", "messages": [{"role": "user", "content": "a long prompt " * 100}], "text": None}
    tasks.add_many([("p0", prompt), ("p1", prompt)])
    for task, keys in zip(tasks.lease("rollout", n=2), (["a", "b"], ["c"])):
        assert tasks.complete(task.token, [item(k) for k in keys])

    def payloads() -> dict[str, str]:
        return dict(conn.execute("SELECT key, payload FROM tasks").fetchall())

    train(conn, ["a", "c"])
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    assert compact_all(queue) == 2
    conn.set_trace_callback(None)
    assert payloads() == {"p0": json.dumps(prompt), "p1": "{}"}  # b, p0's other ref, may still be lost
    (forget,) = {sql for sql in seen if sql.startswith("UPDATE tasks SET payload")}
    plan = " | ".join(r["detail"] for r in conn.execute("EXPLAIN QUERY PLAN " + forget))
    assert "SEARCH refs USING COVERING INDEX refs_task" in plan and "SCAN refs" not in plan, plan
    train(conn, ["b"])
    assert compact_all(queue) == 1 and payloads() == {"p0": "{}", "p1": "{}"}
    assert tasks.counts()["done"] == 2 and tasks.add_many([("p0", prompt), ("p1", prompt)]) == 0
