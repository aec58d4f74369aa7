"""Real rollout processes on one DB: sharing the dataset, kill -9 and restart, trainer gone, Ctrl-C."""

import signal
import subprocess
import sys

import pytest
from conftest import training_ids, wait_until
from test_transport_support import abandon_run

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue

N = 40
SMALL_ARENA = str(600_000)  # room for ~6 samples of the tiny target (max length 256): the rollout blocks


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "run.sqlite"
    yield path
    if path.exists():  # remove this run's arenas from /dev/shm
        abandon_run(connect(path))


def start(db, target, *extra):
    args = ["--db", str(db), "--target-model", str(target), "--num-samples", str(N), "--threads", "1",
            "--no-progress", "--max-length", "256", "--lease-ttl", "3", "--tasks-per-lease", "4",
            "--token-budget", "512", *extra]
    return subprocess.Popen([sys.executable, "-m", "dataflow", "rollout", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start_blocked(db, target, producer_id):
    """A rollout whose small arena fills: it blocks on the watermark, waiting for a trainer to ack."""
    proc = start(db, target, "--producer-id", producer_id, "--max-inflight-bytes", SMALL_ARENA)
    conn = connect(db)

    def blocked() -> bool:
        row = rollout_status(conn, producer_id)
        return row is not None and row.status.startswith("waiting for trainer")

    wait_until(blocked, "the rollout blocks on the watermark", process=proc)
    return proc, conn


def rollout_status(conn, producer_id):
    return {p.id: p for p in RunMeta(conn).processes("rollout")}.get(f"rollout-{producer_id}")


def consume_until_exit(conn, proc):
    """Act as the trainer: ack whatever is pending so the arena frees, until the rollout exits."""
    queue = RefQueue(conn)

    def exited_and_all_acked() -> bool:
        exited = proc.poll() is not None  # read before the ack: what it wrote before exiting is acked below
        queue.ack([lease.token for lease in queue.lease("test-trainer", n=100)])
        return exited

    wait_until(exited_and_all_acked, "the rollout exits", timeout=240)
    return proc.stdout.read()


def all_ref_keys(conn):
    return [r[0] for r in conn.execute("SELECT key FROM refs ORDER BY key")]


def test_two_rollout_processes_on_one_db_produce_every_prompt_exactly_once(db, tiny_target):
    procs = [start(db, tiny_target, "--producer-id", p) for p in ("a", "b")]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    conn = connect(db)
    assert all_ref_keys(conn) == sorted(training_ids(N))
    produced = {p.id: p.info["samples"] for p in RunMeta(conn).processes("rollout")}
    assert sum(produced.values()) == N
    assert RunMeta(conn).end_of_stream()


def test_a_killed_rollout_restarts_and_produces_only_the_remainder(db, tiny_target):
    first, conn = start_blocked(db, tiny_target, "r")
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = set(all_ref_keys(conn))
    assert 0 < len(before) < N and TaskQueue(conn).counts()["leased"] > 0  # it died holding leases

    second = start(db, tiny_target, "--producer-id", "r", "--max-inflight-bytes", SMALL_ARENA)
    output = consume_until_exit(conn, second)
    assert second.returncode == 0, output
    assert all_ref_keys(conn) == sorted(training_ids(N))
    assert rollout_status(conn, "r").info["samples"] == N - len(before)  # nothing produced twice
    assert TaskQueue(conn).counts() == {"pending": 0, "leased": 0, "done": N, "dead": 0}


def test_a_waiting_rollout_reports_a_dead_trainer_and_stops_when_the_trainer_finished(db, tiny_target):
    proc, conn = start_blocked(db, tiny_target, "w")
    meta = RunMeta(conn)
    meta.heartbeat("train-0", "train", "running")
    conn.execute("UPDATE processes SET heartbeat_at = heartbeat_at - 600 WHERE id = 'train-0'")  # a dead trainer
    wait_until(lambda: "is it running?" in rollout_status(conn, "w").status, "the stale-trainer status", process=proc)
    meta.set_run_finished()
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "trainer has finished" in output and "the trainer looks dead" in output
    assert TaskQueue(conn).counts()["leased"] == 0 and not meta.end_of_stream()


def test_ctrl_c_leaves_the_run_resumable(db, tiny_target):
    proc, conn = start_blocked(db, tiny_target, "c")
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "resumable" in output
    counts = TaskQueue(conn).counts()
    assert counts["leased"] == 0 and counts["pending"] > 0  # handed back at once, not at lease expiry
    resumed = start(db, tiny_target, "--producer-id", "c", "--max-inflight-bytes", SMALL_ARENA)
    assert consume_until_exit(conn, resumed) and resumed.returncode == 0
    assert all_ref_keys(conn) == sorted(training_ids(N))
