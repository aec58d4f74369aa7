"""The trainer's life cycle on real processes: one trainer per run, pauses vs the end of a run, checkpoint
writes interrupted by kill -9, signals while waiting, checkpoints that belong to another run."""

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
import torch
from conftest import WAIT_S, wait_until

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.errors import InputError
from dataflow.train.checkpoint import STATE_FILE, read_training_state
from dataflow.train.config import TrainConfig, TrainOptions
from dataflow.train.trainer import train
from test_train_loop import new_run, run_cli, samples, train_args  # noqa: F401 (samples: a fixture)


def trainer_row(meta: RunMeta):
    return next((p for p in meta.processes(role="train") if p.id == "train-0"), None)


def run_cli_plain(args: list[str]) -> subprocess.CompletedProcess:
    """As a user runs it: one-line errors, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "DATAFLOW_DEBUG"}
    return subprocess.run([sys.executable, "-m", "dataflow", "train", *args], env=env, capture_output=True,
                          text=True, timeout=WAIT_S)


# Runs `dataflow train` with a kill -9 of itself at one point of a checkpoint write (argv[1]: "save" = inside
# the write, "record" = after the write, before the run database records it) at the given step (argv[2]).
KILL_DURING_CHECKPOINT = """
import os, signal, sys
import torch
from dataflow.cli import app
from dataflow.control.meta import RunMeta
where, step = sys.argv[1], int(sys.argv[2])
if where == "record":
    record = RunMeta.record_checkpoint
    def record_or_die(self, at, path, ref_ids):
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return record(self, at, path, ref_ids)
    RunMeta.record_checkpoint = record_or_die
else:
    save = torch.save
    def save_or_die(state, path, *args, **kwargs):
        if state.get("step") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(state, path, *args, **kwargs)
    torch.save = save_or_die
sys.argv = ["dataflow", "train", *sys.argv[3:]]
app()
"""


def killed_during_checkpoint(where: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILL_DURING_CHECKPOINT, where, str(step), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S)


def age_heartbeats_while_stopped(process, conn, attempts: int = 50) -> None:
    """SIGSTOP the process, then age every heartbeat by an hour. A stop that lands inside one of its write
    transactions would freeze the database's write lock: then let it run a moment and stop it again."""
    conn.execute("PRAGMA busy_timeout = 200")
    for _ in range(attempts):
        process.send_signal(signal.SIGSTOP)
        try:
            with conn:
                conn.execute("UPDATE processes SET heartbeat_at = heartbeat_at - 3600")
            return
        except sqlite3.OperationalError:
            process.send_signal(signal.SIGCONT)
            time.sleep(0.05)
    raise AssertionError("the trainer always held the write lock when stopped")


def test_a_second_trainer_is_refused_at_once_even_while_the_first_looks_dead(tmp_path, tiny_train_target, samples):
    db = new_run(tmp_path, tiny_train_target, samples)
    first = run_cli(train_args(db, tmp_path / "out", **{"--epochs": 200, "--save-every": 1000}))
    meta = RunMeta(connect(db))
    wait_until(lambda: RefQueue(meta.conn).counts()["acked"] > 0, "the first trainer trains", process=first)
    try:
        age_heartbeats_while_stopped(first, meta.conn)  # one very long step: no heartbeat for an hour
        second = run_cli_plain(train_args(db, tmp_path / "out-2"))
        assert second.returncode == 2, second.stdout + second.stderr
        (line,) = second.stderr.strip().splitlines()
        assert f"already running (pid {first.pid} on " in line, line
        row = trainer_row(meta)
        assert row.pid == first.pid and not row.status.startswith("stopped")  # nothing written under its id
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=WAIT_S) == 0
    counts = RefQueue(meta.conn).counts()
    assert counts["leased"] == counts["acked"] == counts["lost"] == 0


def test_max_steps_pauses_the_run_and_training_again_finishes_it(tmp_path, tiny_train_target, samples):
    db = new_run(tmp_path, tiny_train_target, samples, store="shm")  # an arena: freed bytes cannot come back
    config = TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=2, batch_tokens=64, grad_accum=2)
    paused = train(db, config, TrainOptions(out=tmp_path / "out", max_steps=1, progress=False))
    meta, queue = RunMeta(connect(db)), RefQueue(connect(db))
    assert paused == "max-steps" and not meta.run_finished()
    assert queue.counts()["lost"] == 0 and queue.counts()["pending"] > 0
    assert trainer_row(meta).status == "stopped (max-steps)"

    assert train(db, config, TrainOptions(out=tmp_path / "out", progress=False)) == "finished"
    counts = queue.counts()
    assert counts["trained"] == len(samples) and counts["lost"] == counts["pending"] == 0, counts
    assert meta.run_finished() and (tmp_path / "out" / "final" / STATE_FILE).exists()


def test_a_kill_between_writing_and_recording_a_checkpoint_keeps_the_last_recorded_one(tmp_path, tiny_train_target, samples):
    db, out = new_run(tmp_path, tiny_train_target, samples), tmp_path / "out"
    args = train_args(db, out, **{"--save-every": 1, "--keep": 1, "--grad-accum": 1})
    killed = killed_during_checkpoint("record", 2, args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    recorded = RunMeta(connect(db)).last_checkpoint()
    assert recorded.step == 1 and (tmp_path / "out" / "step-00000001" / STATE_FILE).exists()

    restarted = run_cli(args)
    assert restarted.wait(timeout=WAIT_S) == 0, restarted.stdout.read()
    assert RefQueue(connect(db)).counts()["trained"] == len(samples)
    assert sorted(p.name for p in out.glob("step-*")) == [os.readlink(out / "latest")]  # --keep 1, after all


def test_a_kill_inside_a_checkpoint_write_leaves_no_temp_dir_after_the_restart(tmp_path, tiny_train_target, samples):
    db, out = new_run(tmp_path, tiny_train_target, samples), tmp_path / "out"
    args = train_args(db, out, **{"--save-every": 2})
    killed = killed_during_checkpoint("save", 2, args)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert list(out.glob(".tmp-step-*"))

    restarted = run_cli(args)
    assert restarted.wait(timeout=WAIT_S) == 0, restarted.stdout.read()
    assert not list(out.glob(".tmp-step-*"))


def test_sigterm_ends_the_wait_for_another_holders_leases(tmp_path, tiny_train_target, samples):
    db = new_run(tmp_path, tiny_train_target, samples)
    # A rank of an earlier, larger group died holding two refs, far from their deadline (or the clock jumped back).
    RefQueue(connect(db)).lease("train-1@4242-gone", n=2, ttl=600.0)
    trainer = run_cli(train_args(db, tmp_path / "out"))
    meta = RunMeta(connect(db))

    def waiting() -> bool:
        row = trainer_row(meta)
        return row is not None and row.status.startswith("waiting for leases of train-1@4242-gone to expire")

    wait_until(waiting, "the trainer says whose leases it waits for", process=trainer)
    assert "at most" in trainer_row(meta).status  # bounded, and it says so
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=30) == 0
    assert "stopped (SIGTERM)" in trainer.stdout.read()


def test_a_second_run_writing_the_same_out_dir_is_refused(tmp_path, tiny_train_target, samples):
    out = tmp_path / "out"
    config = TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=2, batch_tokens=64, grad_accum=2)
    train(new_run(tmp_path, tiny_train_target, samples, name="a"), config, TrainOptions(out=out, progress=False))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("step-*")}
    with pytest.raises(InputError, match="belongs to run .* two runs share this --out"):
        train(new_run(tmp_path, tiny_train_target, samples, name="b"), config, TrainOptions(out=out, progress=False))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("step-*")} == before


def test_checkpoints_are_private_and_load_tensors_and_plain_data_only(tmp_path, tiny_train_target, samples):
    out = tmp_path / "out"
    config = TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=2, batch_tokens=64, grad_accum=2)
    train(new_run(tmp_path, tiny_train_target, samples), config, TrainOptions(out=out, progress=False))
    step = (out / "latest").resolve()
    assert stat.S_IMODE(step.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in step.iterdir()} == {0o600}
    assert read_training_state(step)["step"] == 2  # a real state loads with weights_only

    planted = tmp_path / "planted"
    torch.save({"step": 2, "payload": Planter(str(planted))}, step / STATE_FILE)
    with pytest.raises(InputError, match="other than tensors and plain data"):
        read_training_state(step)
    assert not planted.exists()


class Planter:
    """Unpickling this runs code (creates a file): what a crafted training_state.pt could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
