"""The control plane under real processes: producers, consumers and rollout workers, some killed with -9."""

from __future__ import annotations

import json
import time
from collections import Counter

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue, shard_of
from dataflow.control.tasks import TaskQueue
from test_control_support import (
    SPAWN,
    connect_together,
    consume,
    consume_limit,
    item,
    lease_across_a_clock_jump,
    lease_and_hang,
    lease_wait_ack,
    produce,
    read_acked,
    read_published,
    run_all,
    wait_for,
    write_forever,
)


def sleep_past(deadline: float) -> None:
    """Wait until the wall clock passes a lease deadline (waiting, not asserting on time)."""
    while time.time() <= deadline:
        time.sleep(0.05)


def test_one_producer_and_three_consumers_ack_every_one_of_10k_refs_exactly_once(tmp_path):
    db, out = str(tmp_path / "run.sqlite"), tmp_path / "acked.jsonl"
    connect(db).close()
    keys = [str(i) for i in range(10_000)]
    workers = [SPAWN.Process(target=produce, args=(db, keys, 100), name="producer")]
    workers += [
        SPAWN.Process(target=consume, args=(db, f"c{i}", str(out), 64), name=f"consumer{i}") for i in range(3)
    ]
    run_all(workers)

    acked = read_acked(out)
    assert [k for k, n in Counter(acked).items() if n > 1] == []
    assert sorted(acked, key=int) == keys
    counts = RefQueue(connect(db)).counts()
    assert counts == {"pending": 0, "leased": 0, "acked": 10_000, "trained": 0, "dead": 0, "lost": 0}


def test_a_killed_consumers_refs_come_back_after_the_ttl_and_its_tokens_are_refused(tmp_path):
    db, tokens_file = str(tmp_path / "run.sqlite"), tmp_path / "tokens.json"
    conn = connect(db)
    queue = RefQueue(conn)
    queue.put_many([item(str(i)) for i in range(20)])
    victim = SPAWN.Process(target=lease_and_hang, args=(db, "victim", 10, 1.0, str(tokens_file)))
    victim.start()
    held = read_published(tokens_file)
    victim.kill()  # SIGKILL: no cleanup of any kind
    victim.join()

    assert queue.in_flight() == 10
    deadline = conn.execute("SELECT max(lease_deadline) FROM refs").fetchone()[0]
    sleep_past(deadline)
    again = queue.lease("survivor", n=20, ttl=60.0)
    assert sorted(lease.key for lease in again) == sorted(str(i) for i in range(20))
    assert sorted(queue.ack(held["tokens"])) == sorted(held["tokens"])  # the dead consumer's late ack: all stale
    assert queue.ack([lease.token for lease in again]) == []
    assert queue.counts()["acked"] == 20
    came_back = {lease.key: lease.attempts for lease in again}
    assert all(came_back[key] == 0 for key in held["keys"])  # the consumer died: no fault of its refs


def test_a_wall_clock_jump_past_the_ttl_never_hands_a_consumer_its_own_sample_again(tmp_path):
    db, out = str(tmp_path / "run.sqlite"), tmp_path / "jump.json"
    queue = RefQueue(connect(db))
    queue.put_many([item("0"), item("1")])
    jumper = SPAWN.Process(target=lease_across_a_clock_jump, args=(db, "jumper", 5.0, 2 * 5.0 + 1, str(out)))
    jumper.start()
    jumper.join(60)
    result = read_published(out)
    assert result == {"keys": ["0", "1"], "refused": []}  # not "0" twice under two tokens
    assert queue.counts()["acked"] == 2


def test_a_slow_consumers_late_ack_is_refused_once_its_lease_expired_and_was_retaken(tmp_path):
    db, tokens_file, go = str(tmp_path / "run.sqlite"), tmp_path / "tokens.json", tmp_path / "go"
    queue = RefQueue(connect(db))
    queue.put_many([item(str(i)) for i in range(5)])
    slow = SPAWN.Process(target=lease_wait_ack, args=(db, "slow", 5, 0.5, str(tokens_file), str(go)))
    slow.start()
    read_published(tokens_file)
    sleep_past(queue.conn.execute("SELECT max(lease_deadline) FROM refs").fetchone()[0])
    retaken = queue.lease("fast", n=5)
    go.touch()
    slow.join(60)

    late = read_published(tokens_file.with_name("tokens.json.acked"))
    assert len(late["refused"]) == 5
    assert queue.ack([lease.token for lease in retaken]) == []
    assert queue.counts()["acked"] == 5


def test_a_rank_with_work_in_its_own_shard_gets_only_its_own_shard(tmp_path):
    queue = RefQueue(connect(tmp_path / "run.sqlite"))
    queue.put_many([item(str(i)) for i in range(300)])
    for rank in range(3):
        leases = queue.lease(f"r{rank}", n=20, partition=(rank, 3))
        assert len(leases) == 20
        assert {shard_of(lease.key) % 3 for lease in leases} == {rank}


def test_a_rank_whose_shard_is_empty_takes_other_shards_work_instead_of_waiting(tmp_path):
    queue = RefQueue(connect(tmp_path / "run.sqlite"))
    others = [str(i) for i in range(200) if shard_of(str(i)) % 2 == 0][:7]
    queue.put_many([item(k) for k in others])
    leases = queue.lease("r1", n=10, partition=(1, 2))
    assert sorted(lease.key for lease in leases) == sorted(others)


def test_a_rank_fills_its_batch_from_other_shards_when_its_own_runs_short(tmp_path):
    queue = RefQueue(connect(tmp_path / "run.sqlite"))
    keys = [str(i) for i in range(40)]
    queue.put_many([item(k) for k in keys])
    mine = [k for k in keys if shard_of(k) % 4 == 2]
    leases = queue.lease("r2", n=len(mine) + 3, partition=(2, 4))
    assert [lease.key for lease in leases][: len(mine)] == mine
    assert len(leases) == len(mine) + 3


def test_a_reshard_from_two_to_three_consumers_acks_the_remainder_exactly_once(tmp_path):
    db, first, second = str(tmp_path / "run.sqlite"), tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    conn = connect(db)
    keys = [str(i) for i in range(3000)]
    RefQueue(conn).put_many([item(k) for k in keys])
    RunMeta(conn).set_end_of_stream()
    run_all([
        SPAWN.Process(target=consume_limit, args=(db, f"a{r}", str(first), 50, 600, (r, 2)), name=f"a{r}")
        for r in range(2)
    ])
    run_all([
        SPAWN.Process(target=consume, args=(db, f"b{r}", str(second), 50, (r, 3)), name=f"b{r}") for r in range(3)
    ])

    before, after = read_acked(first), read_acked(second)
    assert len(before) == 1200
    assert sorted(before + after, key=int) == keys  # each key acked once over both world sizes
    for line in first.read_text().splitlines():  # each shard holds ~1500 refs > 600: a rank never left its own
        rank = int(json.loads(line)["owner"][1])
        assert {shard_of(k) % 2 for k in json.loads(line)["keys"]} == {rank}


def test_a_restarted_producer_re_putting_the_same_keys_adds_nothing(tmp_path):
    db = str(tmp_path / "run.sqlite")
    keys = [str(i) for i in range(1000)]
    run_all([SPAWN.Process(target=produce, args=(db, keys, 128), name="producer")])
    queue = RefQueue(connect(db))
    acked = queue.lease("trainer", n=300)
    assert queue.ack([lease.token for lease in acked]) == []
    run_all([SPAWN.Process(target=produce, args=(db, keys, 128), name="restarted producer")])

    assert queue.counts() == {"pending": 700, "leased": 0, "acked": 300, "trained": 0, "dead": 0, "lost": 0}
    assert queue.put_many([item(k) for k in keys[:10]]) == [False] * 10


def test_a_killed_rollout_workers_prompts_come_back_after_the_ttl(tmp_path):
    db, tokens_file = str(tmp_path / "run.sqlite"), tmp_path / "tasks.json"
    tasks = TaskQueue(connect(db))
    tasks.add_many([(f"p{i}", {"prompt": i}) for i in range(6)])
    worker = SPAWN.Process(target=lease_and_hang, args=(db, "rollout-a", 4, 0.5, str(tokens_file), "tasks"))
    worker.start()
    held = read_published(tokens_file)
    worker.kill()
    worker.join()

    sleep_past(tasks.conn.execute("SELECT max(lease_deadline) FROM tasks").fetchone()[0])
    again = tasks.lease("rollout-b", n=10)
    assert sorted(task.key for task in again) == [f"p{i}" for i in range(6)]
    assert not any(tasks.complete(token, [item("from-dead-worker")]) for token in held["tokens"])
    assert all(tasks.complete(task.token, [item(f"s{task.key}")]) for task in again)
    assert tasks.counts()["done"] == 6 and tasks.remaining() == 0
    assert RefQueue(tasks.conn).counts()["pending"] == 6


def test_refs_committed_before_a_writer_is_killed_survive_intact(tmp_path):
    db, ready = str(tmp_path / "run.sqlite"), tmp_path / "ready"
    connect(db).close()
    writer = SPAWN.Process(target=write_forever, args=(db, str(ready)))
    writer.start()
    wait_for(ready)
    time.sleep(0.2)  # let it commit more batches, so the kill lands mid-stream
    writer.kill()
    writer.join()

    conn = connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = RefQueue(conn).depth()
    assert count >= 10 and count % 10 == 0  # batches commit whole or not at all
    keys = {r[0] for r in conn.execute("SELECT key FROM refs")}
    assert keys == {f"w{i}" for i in range(count)}
    assert RefQueue(conn).put(item("after-crash")) is True


def test_processes_opening_a_new_database_at_once_all_join_one_run(tmp_path):
    # rollout and train are often started together on a fresh --db; race four openers over 40 new files
    dbs, barrier = [str(tmp_path / f"run{i}.sqlite") for i in range(40)], SPAWN.Barrier(4)
    outs = [tmp_path / f"joined{i}.json" for i in range(4)]
    run_all([SPAWN.Process(target=connect_together, args=(dbs, barrier, str(out)), name=out.stem) for out in outs])
    run_ids = [read_published(out)["run_ids"] for out in outs]
    assert all(len(set(per_db)) == 1 for per_db in zip(*run_ids))


def test_a_reopened_database_keeps_every_state(tmp_path):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    queue = RefQueue(conn, max_attempts=1)
    queue.put_many([item(str(i)) for i in range(6)])
    leased = queue.lease("t", n=4)
    queue.ack([leased[0].token])
    queue.fail(leased[1].token, "boom")
    meta = RunMeta(conn)
    meta.set("target", {"hidden_size": 64})
    run_id = meta.run_id
    conn.close()

    again = connect(db)
    queue = RefQueue(again)
    assert queue.counts() == {"pending": 2, "leased": 2, "acked": 1, "trained": 0, "dead": 1, "lost": 0}
    assert queue.ack([leased[2].token, leased[3].token]) == []  # leases survive a reconnect too
    assert RunMeta(again).run_id == run_id and RunMeta(again).get("target") == {"hidden_size": 64}
    assert queue.dead()[0].last_error == "boom"


def test_a_process_whose_clock_runs_ahead_stamps_its_leases_by_that_clock(tmp_path):
    """DATAFLOW_CLOCK_OFFSET_S puts a process on a skewed wall clock (chaos uses it for clock jumps)."""
    import os
    import subprocess
    import sys

    db = tmp_path / "run.sqlite"
    RefQueue(connect(db)).put(RefItem("a", {"kind": "test"}, 1, "test"))
    code = f"from dataflow.control.db import connect; from dataflow.control.queue import RefQueue; " \
           f"assert RefQueue(connect({str(db)!r})).lease('ahead', ttl=10)"
    env = {**os.environ, "DATAFLOW_CLOCK_OFFSET_S": "1000"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    [deadline] = RefQueue(connect(db)).lease_deadlines().values()
    assert 1000 < deadline - time.time() <= 1010
