"""Prompt tasks (complete is atomic and fenced) and run metadata (config check, heartbeats, marks)."""

from __future__ import annotations

import os

import pytest

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.control.tasks import TaskQueue
from dataflow.errors import ConfigMismatch
from test_control_support import item


def test_adding_tasks_is_idempotent_by_key(conn):
    tasks = TaskQueue(conn)
    assert tasks.add_many([("a", {"i": 0}), ("b", {"i": 1})]) == 2
    assert tasks.add_many([("b", {"i": 9}), ("c", {"i": 2})]) == 1
    assert [t.payload for t in tasks.lease("w", n=5)] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_completing_a_task_puts_its_refs_and_closes_it_together(conn):
    tasks, queue = TaskQueue(conn), RefQueue(conn)
    tasks.add_many([("p", {})])
    (task,) = tasks.lease("w")
    assert tasks.complete(task.token, [item("p"), item("p#e1")]) is True
    assert tasks.counts()["done"] == 1 and tasks.remaining() == 0
    assert {lease.task_id for lease in queue.lease("t", n=5)} == {task.id}


def test_a_failing_completion_puts_no_ref_and_leaves_the_task_leased(conn):
    tasks, queue = TaskQueue(conn), RefQueue(conn)
    tasks.add_many([("p", {})])
    (task,) = tasks.lease("w")
    unserialisable = RefItem(key="bad", handle={"tensor": object()}, nbytes=1, store="shm")
    with pytest.raises(TypeError):
        tasks.complete(task.token, [item("good"), unserialisable])
    assert queue.counts()["pending"] == 0
    assert tasks.counts()["leased"] == 1
    assert tasks.complete(task.token, [item("good")]) is True  # the lease is still usable


def test_completing_with_a_stale_token_puts_nothing(conn):
    tasks, queue = TaskQueue(conn), RefQueue(conn)
    tasks.add_many([("p", {})])
    (old,) = tasks.lease("dead-worker", ttl=-1.0)
    (new,) = tasks.lease("live-worker")
    assert tasks.complete(old.token, [item("from-old")]) is False
    assert tasks.set_payload(old.token, {"reply": "stale"}) is False
    assert tasks.extend([old.token, new.token], 60.0) == [old.token]
    assert queue.counts()["pending"] == 0
    assert tasks.complete(new.token, [item("from-new")]) is True
    assert [lease.key for lease in queue.lease("t")] == ["from-new"]


def test_a_payload_set_under_a_lease_survives_its_expiry(conn):
    tasks = TaskQueue(conn)
    tasks.add_many([("p", {"prompt": "hi"})])
    (task,) = tasks.lease("w", ttl=-1.0)
    assert tasks.set_payload(task.token, {"prompt": "hi", "reply": "hello"}) is True
    (again,) = tasks.lease("w2")
    assert again.payload == {"prompt": "hi", "reply": "hello"} and again.attempts == 0


def test_a_task_that_keeps_failing_ends_dead(conn):
    tasks = TaskQueue(conn, max_attempts=2)
    tasks.add_many([("p", {})])
    tasks.fail(tasks.lease("w")[0].token, "tokenizer error")
    tasks.fail(tasks.lease("w")[0].token, "tokenizer error")
    assert tasks.lease("w") == [] and tasks.counts()["dead"] == 1 and tasks.remaining() == 0


def test_the_first_config_is_recorded_and_a_differing_key_is_named(conn):
    meta = RunMeta(conn)
    meta.record_or_check_config("train", {"lr": 1e-4, "batch": 8, "layers": (1, 2)})
    meta.record_or_check_config("train", {"lr": 1e-4, "batch": 8, "layers": [1, 2]})  # same once stored as JSON
    meta.record_or_check_config("rollout", {"batch": 99})  # sections are independent
    with pytest.raises(ConfigMismatch, match=r"train options: --batch 8 \(now 16\), --lr 0.0001 \(now 0.001\);"):
        meta.record_or_check_config("train", {"lr": 1e-3, "batch": 16, "layers": [1, 2]})  # every differing key at once
    # An option added after the run started (a newer dataflow resuming it) is recorded, then held to.
    meta.record_or_check_config("train", {"lr": 1e-4, "batch": 8, "layers": [1, 2], "seed": 3})
    with pytest.raises(ConfigMismatch, match=r"--seed 3 \(now 4\)"):
        meta.record_or_check_config("train", {"lr": 1e-4, "batch": 8, "layers": [1, 2], "seed": 4})
    with pytest.raises(ConfigMismatch, match=r"--seed 3 \(now None\)"):  # and dropping a recorded one is refused
        meta.record_or_check_config("train", {"lr": 1e-4, "batch": 8, "layers": [1, 2]})


def test_the_recorded_config_is_checked_from_another_connection(tmp_path):
    path = tmp_path / "run.sqlite"
    RunMeta(connect(path)).record_or_check_config("rollout", {"model": "/models/a"})
    with pytest.raises(ConfigMismatch, match="model"):
        RunMeta(connect(path)).record_or_check_config("rollout", {"model": "/models/b"})


def test_heartbeats_register_processes_with_their_role_status_and_info(conn):
    meta = RunMeta(conn)
    meta.heartbeat("rollout-0", "rollout", info={"rate": 1.5})
    meta.heartbeat("train-0", "train", status="waiting for data")
    meta.heartbeat("rollout-0", "rollout", status="finished", info={"rate": 2.0})
    rollout, train = meta.processes()
    assert (rollout.id, rollout.status, rollout.info) == ("rollout-0", "finished", {"rate": 2.0})
    assert rollout.pid == os.getpid()
    assert rollout.heartbeat_at >= rollout.started_at and train.alive()
    assert not train.alive(now=train.heartbeat_at + 3600)
    assert not rollout.alive()  # its last heartbeat said it finished: gone at once, not when it goes stale
    assert [p.id for p in meta.processes(role="train")] == ["train-0"]


def test_end_of_stream_and_run_finished_are_durable_marks(tmp_path):
    path = tmp_path / "run.sqlite"
    meta = RunMeta(connect(path))
    assert not meta.end_of_stream() and not meta.run_finished()
    meta.set_end_of_stream()
    meta.set_run_finished()
    again = RunMeta(connect(path))
    assert again.end_of_stream() and again.run_finished()


def test_metadata_values_round_trip_as_json(conn):
    meta = RunMeta(conn)
    vocab = {"draft_vocab_size": 3, "d2t": [0, 5, 9]}
    meta.set("vocab", vocab)
    assert meta.get("vocab") == vocab and meta.get("absent", "default") == "default"
    assert meta.last_checkpoint() is None
