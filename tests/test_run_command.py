"""`dataflow run`: both children on one run, Ctrl-C stops both resumably, a failing child fails the run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import leftover_segments, wait_until

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue
from dataflow.run import TRAINER_NICENESS

SAMPLES = 24


def run_command(db, target, *extra):
    return [
        sys.executable, "-m", "dataflow", "run", "--db", str(db), "--target-model", str(target),
        "--num-samples", str(SAMPLES), "--max-length", "96", "--draft-vocab-size", "256", "--threads", "1",
        "--tasks-per-lease", "2", "--token-budget", "192", "--batch-tokens", "192", "--ttt-length", "2",
        "--save-every", "2", "--lease-ttl", "5", "--no-progress", *extra,
    ]


@pytest.mark.slow
def test_ctrl_c_stops_both_children_and_a_second_run_finishes_the_job(tmp_path, tiny_target):
    db = tmp_path / "run.sqlite"
    first = subprocess.Popen(run_command(db, tiny_target), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(db.exists, "the run database exists", process=first)
    queue = RefQueue(connect(db))
    wait_until(lambda: queue.counts()["acked"] + queue.counts()["trained"] > 0, "a sample is trained", process=first)
    pids = {p.role: p.pid for p in RunMeta(queue.conn).processes()}
    # the trainer takes the CPU the rollout leaves (its niceness, and its session's where Linux has autogroups)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pids["train"]) == min(ours + TRAINER_NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, pids["rollout"]) == ours
    autogroup = Path(f"/proc/{pids['train']}/autogroup")
    if autogroup.exists():
        assert autogroup.read_text().split()[-1] == str(TRAINER_NICENESS)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130
    meta = RunMeta(queue.conn)
    statuses = {p.role: p.status for p in meta.processes()}
    assert statuses["train"].startswith(("stopped", "finished")), statuses
    assert not meta.run_finished()
    for p in meta.processes():  # no orphaned child keeps running
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)

    second = subprocess.run(run_command(db, tiny_target), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    counts = queue.counts()
    assert counts["trained"] == SAMPLES and counts["dead"] == 0
    assert meta.run_finished()


def test_a_failing_child_fails_the_run_with_its_log(tmp_path, tiny_target):
    db = tmp_path / "run.sqlite"
    done = subprocess.run(run_command(db, tiny_target, "--dataset", str(tmp_path / "missing.jsonl")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "`dataflow rollout` failed" in done.stderr and "rollout.log" in done.stderr
    assert "missing.jsonl" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_run_stops_both_children_cleanly_and_waits_for_them(tmp_path, tiny_target, signum):
    db = tmp_path / "run.sqlite"
    parent = subprocess.Popen(run_command(db, tiny_target), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until(db.exists, "the run database exists", process=parent)
    meta = RunMeta(connect(db))
    try:
        wait_until(lambda: {p.role for p in meta.processes()} == {"rollout", "train"}, "both children are up",
                   process=parent)
        parent.send_signal(signum)
        assert parent.wait(timeout=120) == 128 + signum
        assert "resumable" in parent.stderr.read()
        processes = meta.processes()
        assert {p.role for p in processes} == {"rollout", "train"}
        for p in processes:  # both children stopped (and were waited for) before the parent exited
            with pytest.raises(ProcessLookupError):
                os.kill(p.pid, 0)
        assert TaskQueue(meta.conn).counts()["leased"] == 0  # the rollout handed its prompts back
    finally:
        parent.kill()
        for p in meta.processes():  # never leave a child of this run behind, even when the test fails
            cmdline = Path(f"/proc/{p.pid}/cmdline")
            if cmdline.exists() and str(db) in cmdline.read_text(errors="replace"):
                os.kill(p.pid, signal.SIGKILL)
        for segment in leftover_segments(meta.run_id):  # a stopped run keeps its arena to resume; this one never is
            segment.unlink()


@pytest.mark.slow
def test_a_run_paused_by_max_steps_returns_and_running_again_finishes_it(tmp_path, tiny_target):
    db = tmp_path / "run.sqlite"
    paused = subprocess.run(run_command(db, tiny_target, "--max-steps", "1"), capture_output=True, text=True, timeout=300)
    assert paused.returncode == 0, paused.stderr[-2000:]  # the rollout waiting for the trainer is stopped too
    meta = RunMeta(connect(db))
    assert not meta.run_finished() and {p.role: p.status for p in meta.processes()}["train"] == "stopped (max-steps)"
    again = subprocess.run(run_command(db, tiny_target), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert RefQueue(meta.conn).counts()["trained"] == SAMPLES and meta.run_finished()
