"""RefQueue semantics in one process: idempotent put, fenced ack/fail/extend, dead letters, lost features,
the trainer-restart put-back and checkpoints (invariant 5)."""

from __future__ import annotations

import time

import pytest

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.control.tasks import TaskQueue
from test_control_support import item


def states(queue: RefQueue) -> dict[str, int]:
    return {name: n for name, n in queue.counts().items() if n}


def test_put_is_idempotent_by_key_and_says_whether_the_ref_was_new(conn):
    queue = RefQueue(conn)
    assert queue.put(item("a")) is True
    assert queue.put_many([item("a"), item("b"), item("b")]) == [False, True, False]
    assert states(queue) == {"pending": 2}


def test_a_re_put_of_a_live_key_keeps_the_original_handle(conn):
    queue = RefQueue(conn)
    queue.put(RefItem(key="a", handle={"offset": 1}, nbytes=10, store="shm"))
    queue.put(RefItem(key="a", handle={"offset": 2}, nbytes=20, store="shm"))
    assert queue.lease("t")[0].handle == {"offset": 1}


def test_a_lease_carries_the_handle_a_token_and_a_wall_clock_deadline(conn):
    queue = RefQueue(conn)
    queue.put(RefItem(key="a", handle={"offset": 64, "length": 8}, nbytes=8, store="arena-1", task_id=None))
    before = time.time()
    (lease,) = queue.lease("trainer-0", n=5, ttl=30.0)
    after = time.time()
    assert (lease.key, lease.handle, lease.nbytes, lease.store, lease.attempts) == (
        "a", {"offset": 64, "length": 8}, 8, "arena-1", 0
    )
    assert len(lease.token) == 32 and before + 30.0 <= lease.deadline <= after + 30.0
    assert (queue.depth(), queue.in_flight()) == (0, 1)


def test_leases_come_in_put_order_and_never_twice(conn):
    queue = RefQueue(conn)
    queue.put_many([item(str(i)) for i in range(10)])
    first, second = queue.lease("a", n=4), queue.lease("b", n=10)
    assert [lease.key for lease in first + second] == [str(i) for i in range(10)]
    assert queue.lease("c", n=1) == []


def test_ack_is_fenced_by_token_and_reports_what_it_did_not_ack(conn):
    queue = RefQueue(conn)
    queue.put_many([item("a"), item("b")])
    a, b = queue.lease("t", n=2)
    assert queue.ack([a.token, "not-a-token"]) == ["not-a-token"]
    assert queue.ack([a.token]) == [a.token]  # acked once only
    assert states(queue) == {"acked": 1, "leased": 1}
    assert queue.ack([b.token]) == []


def test_the_token_index_holds_live_leases_only(conn):
    # every way out of LEASED clears the token: the unique index stays the size of what is in flight
    queue = RefQueue(conn, max_attempts=1)
    queue.put_many([item(str(i)) for i in range(6)])
    acked, failed, lost, expired, held, _ = queue.lease("t", n=6)
    queue.ack([acked.token])
    queue.fail(failed.token, "x")
    queue.mark_lost(lost.token, "gone")
    queue.extend([expired.token], -1.0)
    queue.reclaim()
    assert [r[0] for r in conn.execute("SELECT key FROM refs WHERE lease_token IS NOT NULL ORDER BY id")] == [
        held.key, _.key
    ]


def test_an_expired_lease_is_reclaimed_and_its_old_token_is_fenced_out(conn):
    queue = RefQueue(conn)
    queue.put(item("a"))
    (old,) = queue.lease("slow", ttl=-1.0)  # already past its deadline
    (new,) = queue.lease("fast")
    assert (new.key, new.attempts) == ("a", 0) and new.token != old.token  # a lapse is no failure of "a"
    assert queue.ack([old.token]) == [old.token]
    assert queue.fail(old.token, "late") is False
    assert queue.extend([old.token], 60.0) == [old.token]
    assert queue.ack([new.token]) == []


def test_extend_keeps_a_lease_alive_and_names_the_tokens_it_no_longer_holds(conn):
    queue = RefQueue(conn)
    queue.put_many([item("a"), item("b")])
    a, b = queue.lease("t", n=2, ttl=-1.0)
    assert queue.ack([b.token]) == []
    assert queue.extend([a.token, b.token], 60.0) == [b.token]
    assert queue.lease("other") == []  # a is held again, not reclaimed
    assert queue.reclaim() == 0


def test_a_retryable_failure_returns_the_ref_and_counts_the_attempt(conn):
    queue = RefQueue(conn, max_attempts=3)
    queue.put(item("a"))
    assert queue.fail(queue.lease("t")[0].token, "oom") is True
    assert queue.lease("t")[0].attempts == 1


def test_a_ref_is_dead_after_max_attempts_with_its_last_error_kept(conn):
    queue = RefQueue(conn, max_attempts=3)
    queue.put(item("a"))
    for attempt in range(3):
        queue.fail(queue.lease("t")[0].token, f"error {attempt}")
    assert queue.lease("t") == []
    (dead,) = queue.dead()
    assert (dead.key, dead.attempts, dead.last_error) == ("a", 3, "error 2")


def test_a_non_retryable_failure_kills_the_ref_at_once(conn):
    queue = RefQueue(conn, max_attempts=5)
    queue.put(item("a"))
    queue.fail(queue.lease("t")[0].token, "corrupt features", retryable=False)
    assert [(d.attempts, d.last_error) for d in queue.dead()] == [(1, "corrupt features")]


def test_leases_that_keep_expiring_never_make_a_ref_dead(conn):
    # Holders that crash while holding a ref (kill -9, OOM-kill) are not failures of the ref (issue 10 item 7).
    queue = RefQueue(conn, max_attempts=2)
    queue.put(item("a"))
    for crash in range(5):
        queue.lease(f"crashy-{crash}", ttl=-1.0)
    assert queue.reclaim() == 1 and queue.dead() == []
    assert queue.counts()["pending"] == 1
    (again,) = queue.lease("healthy")
    assert again.attempts == 0
    assert "lease expired (owner crashy-4)" in conn.execute("SELECT last_error FROM refs").fetchone()[0]


def test_a_consumer_never_reclaims_its_own_expired_lease(conn):
    # A wall-clock jump past the ttl must not hand a consumer its own carried sample back under a new token.
    queue = RefQueue(conn)
    queue.put_many([item("a"), item("b")])
    (a,) = queue.lease("me", ttl=-1.0)
    (b,) = queue.lease("me", ttl=60.0)  # renews "a" instead of reclaiming it
    assert b.key == "b" and queue.lease("other") == []
    assert queue.ack([a.token, b.token]) == []


def test_giving_leases_back_on_stop_is_not_a_failure(conn):
    queue = RefQueue(conn, max_attempts=1)
    queue.put_many([item("a"), item("b")])
    a, b = queue.lease("stopping", n=2)
    assert queue.release([a.token, b.token, "never-issued"], "trainer stopped") == ["never-issued"]
    assert queue.dead() == [] and [lease.attempts for lease in queue.lease("next", n=2)] == [0, 0]


def test_a_stopping_rollout_gives_back_every_task_it_holds_even_one_whose_grant_it_never_saw(conn):
    tasks = TaskQueue(conn, max_attempts=1)
    tasks.add_many([(f"p{i}", {"prompt": str(i)}) for i in range(4)])
    tasks.lease("rollout-0@1-aaaaaaaa", n=2)  # granted, then the stop landed before the holder recorded them
    tasks.lease("rollout-1@2-bbbbbbbb", n=1)  # another rollout's: it keeps it
    assert tasks.release_owned("rollout-0@1-aaaaaaaa", "rollout interrupted") == 2
    assert tasks.counts()["leased"] == 1 and tasks.dead() == []
    assert sorted(t.attempts for t in tasks.lease("next", n=3)) == [0, 0, 0]


def test_a_restarted_holder_takes_back_its_dead_predecessors_leases_at_once(conn):
    queue = RefQueue(conn)
    queue.put_many([item("a"), item("b"), item("c")])
    queue.lease("train-0@111-old", n=1, ttl=600.0)
    queue.lease("train-1@222-other", n=1, ttl=600.0)
    (mine,) = queue.lease("train-0@333-new", n=1, ttl=600.0)
    assert queue.release_owners("train-0@", "train-0@333-new", "restarted") == 1
    assert set(queue.lease_deadlines()) == {"train-1@222-other", "train-0@333-new"}
    assert [lease.key for lease in queue.lease("train-0@333-new", n=3)] == ["a"]


def test_requeue_dead_gives_all_or_the_chosen_dead_refs_fresh_attempts(conn):
    queue = RefQueue(conn, max_attempts=1)
    queue.put_many([item("a"), item("b"), item("c")])
    for lease in queue.lease("t", n=3):
        queue.fail(lease.token, "x")
    ids = {d.key: d.id for d in queue.dead()}
    assert queue.requeue_dead([ids["b"]]) == 1
    (b,) = queue.lease("t", n=3)
    assert (b.key, b.attempts) == ("b", 0)
    assert queue.requeue_dead() == 2
    assert sorted(lease.key for lease in queue.lease("t", n=3)) == ["a", "c"]


def test_mark_lost_re_queues_the_prompt_task_and_a_re_put_revives_the_key(conn):
    queue, tasks = RefQueue(conn), TaskQueue(conn)
    tasks.add_many([("p1", {"prompt": "hi"})])
    (task,) = tasks.lease("rollout")
    tasks.complete(task.token, [RefItem(key="p1", handle={"gen": 1}, nbytes=8, store="shm")])
    (lease,) = queue.lease("trainer")
    assert lease.task_id == task.id
    assert queue.mark_lost(lease.token, "arena generation changed") is True
    assert queue.mark_lost(lease.token, "twice") is False
    assert states(queue) == {"lost": 1} and tasks.counts()["pending"] == 1
    assert queue.ack([lease.token]) == [lease.token]

    (again,) = tasks.lease("rollout")
    assert again.key == "p1"
    assert tasks.complete(again.token, [RefItem(key="p1", handle={"gen": 2}, nbytes=8, store="shm")])
    (revived,) = queue.lease("trainer")
    assert (revived.key, revived.handle, revived.attempts) == ("p1", {"gen": 2}, 0)


def test_losing_a_store_loses_only_its_live_refs(conn):
    queue = RefQueue(conn)
    queue.put_many([item("a", store="arena-1"), item("b", store="arena-1"), item("c", store="arena-2")])
    (a,) = queue.lease("t")
    queue.ack([a.token])
    assert queue.lose_store("arena-1", "arena vanished") == 1
    assert states(queue) == {"acked": 1, "lost": 1, "pending": 1}
    assert queue.live_handles("arena-2") == [{"key": "c", "offset": 0}]
    assert queue.live_handles("arena-1") == []


def test_live_handles_and_bytes_cover_pending_and_leased_refs_only(conn):
    queue = RefQueue(conn)
    queue.put_many([RefItem(key=k, handle={"k": k}, nbytes=n, store="s") for k, n in [("a", 10), ("b", 20), ("c", 40)]])
    a, b = queue.lease("t", n=2)
    queue.ack([a.token])
    assert sorted(h["k"] for h in queue.live_handles("s")) == ["b", "c"]
    assert (queue.live_bytes("s"), queue.live_bytes(), queue.live_bytes("other")) == (60, 60, 0)


def test_a_trainer_restart_puts_back_acked_refs_and_loses_the_freed_ones(conn):
    queue, tasks = RefQueue(conn), TaskQueue(conn)
    tasks.add_many([(f"p{i}", {}) for i in range(4)])
    for task in tasks.lease("rollout", n=4):
        spilled = task.key in ("p0", "p1")  # features that survive an ack (files store)
        tasks.complete(task.token, [RefItem(key=task.key, handle={"spilled": spilled}, nbytes=1, store="s")])
    leases = queue.lease("trainer", n=4)
    queue.ack([lease.token for lease in leases])
    RunMeta(conn).record_checkpoint(step=10, path="ckpt/10", ref_ids=[leases[0].id])  # p0 is durably trained

    acked = queue.acked()
    assert [a.handle["spilled"] for a in acked] == [True, False, False]  # p0 is TRAINED, not acked
    spilled = [a.id for a in acked if a.handle["spilled"]]
    assert queue.put_back(spilled, [a.id for a in acked if a.id not in spilled]) == (1, 2)
    assert queue.put_back([a.id for a in acked], []) == (0, 0)  # fenced: no longer ACKED
    assert states(queue) == {"trained": 1, "pending": 1, "lost": 2}
    (again,) = queue.lease("trainer", n=4)
    assert again.key == "p1" and again.attempts == 0  # a put-back costs the ref none of its attempts
    assert sorted(task.key for task in tasks.lease("rollout", n=4)) == ["p2", "p3"]


def test_a_checkpoint_moves_exactly_the_listed_acked_refs_to_trained(conn):
    queue, meta = RefQueue(conn), RunMeta(conn)
    queue.put_many([item(str(i)) for i in range(5)])
    leases = queue.lease("t", n=4)
    queue.ack([lease.token for lease in leases[:3]])
    listed = [leases[0].id, leases[1].id, leases[3].id]  # leases[3] is still leased: must stay so
    checkpoint_id = meta.record_checkpoint(step=7, path="/ckpt/7", ref_ids=listed)

    trained = [
        r[0] for r in conn.execute("SELECT id FROM refs WHERE state = 3 AND checkpoint_id = ?", (checkpoint_id,))
    ]
    assert sorted(trained) == sorted([leases[0].id, leases[1].id])
    assert states(queue) == {"trained": 2, "acked": 1, "leased": 1, "pending": 1}
    last = meta.last_checkpoint()
    assert (last.id, last.step, last.path, last.num_refs) == (checkpoint_id, 7, "/ckpt/7", 2)


def test_bad_arguments_are_refused(conn):
    with pytest.raises(ValueError):
        RefQueue(conn, max_attempts=0)
    with pytest.raises(ValueError):
        RefQueue(conn).lease("t", partition=(2, 2))
