"""`dataflow run`: both children on one run, Ctrl-C stops both resumably, a failing child fails the run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.testing import build_tiny_target

SAMPLES = 24


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "t")


def run_command(db, target, *extra):
    return [
        sys.executable, "-m", "dataflow", "run", "--db", str(db), "--target-model", str(target),
        "--num-samples", str(SAMPLES), "--max-length", "96", "--draft-vocab-size", "256", "--threads", "1",
        "--tasks-per-lease", "2", "--token-budget", "192", "--batch-tokens", "192", "--ttt-length", "2",
        "--save-every", "2", "--lease-ttl", "5", "--no-progress", *extra,
    ]


def wait_until(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow
def test_ctrl_c_stops_both_children_and_a_second_run_finishes_the_job(tmp_path, target):
    db = tmp_path / "run.sqlite"
    first = subprocess.Popen(run_command(db, target), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(db.exists)
    queue = RefQueue(connect(db))
    wait_until(lambda: queue.counts()["acked"] + queue.counts()["trained"] > 0)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130
    meta = RunMeta(queue.conn)
    statuses = {p.role: p.status for p in meta.processes()}
    assert statuses["train"].startswith(("stopped", "finished")), statuses
    assert not meta.train_finished()
    for p in meta.processes():  # no orphaned child keeps running
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)

    second = subprocess.run(run_command(db, target), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    counts = queue.counts()
    assert counts["trained"] == SAMPLES and counts["dead"] == 0
    assert meta.train_finished()


def test_a_failing_child_fails_the_run_with_its_log(tmp_path, target):
    db = tmp_path / "run.sqlite"
    done = subprocess.run(run_command(db, target, "--dataset", str(tmp_path / "missing.jsonl")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "`dataflow rollout` failed" in done.stderr and "rollout.log" in done.stderr
    assert "missing.jsonl" in done.stderr
