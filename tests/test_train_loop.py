"""The trainer on real runs: a tiny Llama's real features, the real queue and stores, real processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_until

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue, RefState
from dataflow.train.checkpoint import read_export
from dataflow.train.config import TrainConfig, TrainOptions
from dataflow.train.plot import read_metrics
from dataflow.train.testing import seed_run, tiny_features
from dataflow.train.trainer import train, wait_reason

DRAFT_VOCAB = 160


@pytest.fixture(scope="module")
def samples(tiny_train_target):
    return tiny_features(tiny_train_target, [24, 32, 20, 28, 32, 24, 16, 30])


def new_run(tmp_path: Path, target, samples, *, store="files", name="run") -> Path:
    db = tmp_path / f"{name}.sqlite"
    seed_run(db, target, samples, draft_vocab_size=DRAFT_VOCAB, store=store, store_dir=tmp_path / f"{name}-store")
    return db


def train_args(db: Path, out: Path, **extra) -> list[str]:
    args = {"--db": db, "--out": out, "--lr": 3e-3, "--warmup-steps": 2, "--ttt-length": 3, "--batch-tokens": 64,
            "--grad-accum": 2, "--log-every": 1, "--device": "cpu"} | extra
    return [str(x) for kv in args.items() for x in kv] + ["--no-progress", "--no-compile"]  # compile: other tests


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return read_export(out / "final")[1]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a if a[n].is_floating_point())


def test_the_draft_overfits_a_handful_of_samples(tmp_path, tiny_train_target, samples):
    db = new_run(tmp_path, tiny_train_target, samples[:4])
    config = TrainConfig(lr=3e-3, warmup_steps=5, ttt_length=2, batch_tokens=256)
    ending = train(db, config, TrainOptions(out=tmp_path / "out", epochs=80, log_every=10, progress=False))
    assert ending == "finished"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["acc_0"] < 0.5 and rows[-1]["acc_0"] > 0.9, (rows[0]["acc_0"], rows[-1]["acc_0"])
    assert rows[0]["tau_hat"] < 1.5 < rows[-1]["tau_hat"] <= 3.0  # ttt 2: at most 1 + 1 + 1
    meta = RunMeta(connect(db))
    (trainer,) = meta.processes(role="train")
    assert trainer.info["tau_hat"] == pytest.approx(rows[-1]["tau_hat"], abs=1e-4)  # what `status` shows
    assert meta.run_finished() and RefQueue(meta.conn).counts()["trained"] == 4 * 80


def train_beats(observer) -> list[tuple[str, float]]:
    """(status, heartbeat age in s) of the run's trainers, as `status` or a peer reads them."""
    from dataflow.control import clock

    return [(p.status, clock.now() - p.heartbeat_at) for p in RunMeta(observer).processes(role="train")]


def test_a_step_longer_than_the_heartbeat_and_the_lease_ttl_keeps_both_fresh(tmp_path, tiny_train_target, samples,
                                                                              monkeypatch, capsys):
    from dataflow.control import clock
    from dataflow.train.step import TrainStep

    db = new_run(tmp_path, tiny_train_target, samples[:4])
    observer, seen = connect(db), []  # what `status`, a peer or a restarted trainer would read mid-step
    accumulate = TrainStep.accumulate

    def slow(self, *args, **kwargs):  # stands for a first step that compiles: minutes at low priority
        time.sleep(2.5)
        ages = [age for _, age in train_beats(observer)] or [float("inf")]
        leased = f"SELECT lease_deadline FROM refs WHERE state = {RefState.LEASED:d}"
        deadlines = [r[0] for r in observer.execute(leased)]
        seen.append((min(ages), min(deadlines) - clock.now()))
        return accumulate(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "accumulate", slow)
    options = TrainOptions(out=tmp_path / "out", lease_ttl=0.4, compile=False, progress=False)
    assert train(db, TrainConfig(ttt_length=2, batch_tokens=256), options) == "finished"
    assert seen and all(age < 1.0 and left > 0 for age, left in seen), seen  # beat every 0.1 s, leases held
    assert "lapsed" not in capsys.readouterr().out
    assert RefQueue(observer).counts()["trained"] == 4


def test_building_the_draft_heartbeats(tmp_path, tiny_train_target, samples, monkeypatch):
    from dataflow.train import trainer as trainer_module

    db = new_run(tmp_path, tiny_train_target, samples[:2])
    observer, ages = connect(db), []
    build = trainer_module.build_draft

    def slow(*args, **kwargs):  # stands for loading a big target's head
        time.sleep(2.5)
        ages.append(train_beats(observer))
        return build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_draft", slow)
    options = TrainOptions(out=tmp_path / "out", compile=False, progress=False)
    assert train(db, TrainConfig(ttt_length=2), options) == "finished"
    [[(status, age)]] = ages
    assert status == "building the draft" and age < 1.0, (status, age)


def test_online_shm_and_offline_files_training_give_equal_weights(tmp_path, tiny_train_target, samples):
    outs = {}
    for store in ("shm", "files"):
        db = new_run(tmp_path, tiny_train_target, samples, store=store, name=store)
        options = TrainOptions(out=tmp_path / f"out-{store}", progress=False)
        train(db, TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=3, batch_tokens=64, grad_accum=2), options)
        outs[store] = final_weights(tmp_path / f"out-{store}")
    assert max_difference(outs["shm"], outs["files"]) <= 1e-6


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "DATAFLOW_DEBUG": "1"}
    return subprocess.Popen([sys.executable, "-m", "dataflow", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


PRODUCER = """
import sys, time
from pathlib import Path
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.train.testing import tiny_features
from dataflow.transport import open_writer
db, target = sys.argv[1], Path(sys.argv[2])
conn = connect(db)
meta, queue = RunMeta(conn), RefQueue(conn)
writer = open_writer(conn, store="shm", producer_id="rollout-0", max_inflight_bytes=1 << 20)
for i, sample in enumerate(tiny_features(target, [24, 32, 20, 28, 32, 24, 16, 30], seed=1)):
    meta.heartbeat("rollout-0", "rollout", "producing")
    handle, nbytes = writer.write(f"live{i}", sample)
    queue.put(RefItem(key=f"live{i}", handle=handle, nbytes=nbytes, store=handle["store"]))
    time.sleep(0.2)
meta.set_end_of_stream()
meta.heartbeat("rollout-0", "rollout", "finished")
writer.close()
"""


def test_training_beside_a_live_producer_trains_every_ref_once(tmp_path, tiny_train_target, samples):
    db = tmp_path / "live.sqlite"
    seed_run(db, tiny_train_target, samples[:1], draft_vocab_size=DRAFT_VOCAB, store="shm", end_of_stream=False)
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(db), str(tiny_train_target)])
    config = TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=2, batch_tokens=64, grad_accum=2)
    ending = train(db, config, TrainOptions(out=tmp_path / "out", fill_wait=0.1, log_every=1, progress=False))
    assert producer.wait(timeout=120) == 0 and ending == "finished"
    counts = RefQueue(connect(db)).counts()
    assert counts["trained"] == 9 and counts["lost"] == counts["dead"] == counts["pending"] == 0


def test_kill_9_mid_training_then_restart_equals_a_run_never_killed(tmp_path, tiny_train_target, samples):
    # Some prompts held out (--validation-share): their refs are acked untrained, and count in the schedule.
    extra = {"--epochs": 4, "--save-every": 3, "--lease-ttl": 1, "--validation-share": 0.3, "--validate-every": 2}
    reference = run_cli(train_args(new_run(tmp_path, tiny_train_target, samples, name="ref"), tmp_path / "out-ref", **extra))
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    db = new_run(tmp_path, tiny_train_target, samples, name="killed")
    victim = run_cli(train_args(db, tmp_path / "out-killed", **extra))
    meta, queue = RunMeta(connect(db)), RefQueue(connect(db))
    wait_until(lambda: meta.last_checkpoint() and queue.counts()["acked"] and queue.counts()["leased"],
               "the trainer has a checkpoint, acked and leased refs (to be killed)", process=victim, every=0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not meta.run_finished() and queue.counts()["acked"] > 0

    restarted = run_cli(train_args(db, tmp_path / "out-killed", **extra))
    assert restarted.wait(timeout=300) == 0
    log = restarted.stdout.read()
    assert "put back" in log and "resumed from" in log, log
    assert max_difference(final_weights(tmp_path / "out-ref"), final_weights(tmp_path / "out-killed")) <= 1e-6
    lrs = {run: [row["lr"] for row in read_metrics(tmp_path / f"out-{run}") if "lr" in row] for run in ("ref", "killed")}
    assert lrs["killed"] == lrs["ref"] and len(set(lrs["ref"])) > 3, lrs  # the schedule moved and resumed exactly
    counts = queue.counts()
    assert counts["trained"] == 4 * len(samples) and counts["acked"] == counts["pending"] == counts["leased"] == 0


GROUP_TEARDOWN = """
import os, torch
from dataflow.train.dist import all_sum, close_dist, init_dist
dist = init_dist("cpu")
torch.optim.AdamW(torch.nn.Linear(4, 4).parameters())  # imports dynamo with the group alive, as TrainStep does
all_sum(dist, [1.0])
close_dist(dist)
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
assert not [t for t in threads if "gloo" in t], threads
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process's threads from /proc")
def test_closing_the_group_stops_the_gloo_threads_before_the_interpreter_exits(tmp_path):
    # A gloo thread left at interpreter shutdown aborts the rank when it drops a collective's tensor (a
    # nondeterministic exit code -6 after a finished run); a group that is really destroyed has no threads left.
    (tmp_path / "teardown.py").write_text(GROUP_TEARDOWN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "teardown.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_two_ranks_over_gloo_train_every_ref_once(tmp_path, tiny_train_target, samples):
    db = new_run(tmp_path, tiny_train_target, samples)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dataflow", "train", *train_args(db, tmp_path / "out", **{"--epochs": 2, "--save-every": 2})]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    meta = RunMeta(connect(db))
    assert meta.run_finished()
    assert RefQueue(meta.conn).counts()["trained"] == 2 * len(samples)
    assert {p.id for p in meta.processes(role="train")} == {"train-0", "train-1"}
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_waiting_says_how_long_ago_the_rollout_was_last_seen():
    now = 1000.0
    assert wait_reason(None, now) == "waiting for rollout (not started yet)"
    assert wait_reason(now - 2, now) == "waiting for data from the rollout"
    assert wait_reason(now - 95, now) == "waiting for rollout (last seen 95s ago)"


def test_gradient_accumulation_equals_one_big_padded_batch(tmp_path, tiny_train_target, samples):
    # Lengths 24,32,20,28 | 32,24,16,30: a 64-token budget packs each step as two micro-batches, a
    # 128-token budget as one; the steps hold the same samples, so the updates must agree (in fp32: bf16
    # rounds the two layouts' matmuls differently).
    outs = {}
    for budget, accum in ((64, 2), (128, 1)):
        db = new_run(tmp_path, tiny_train_target, samples, name=f"b{budget}")
        config = TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=3, batch_tokens=budget, grad_accum=accum,
                             dtype="fp32")
        train(db, config, TrainOptions(out=tmp_path / f"out-{budget}", progress=False))
        outs[budget] = final_weights(tmp_path / f"out-{budget}")
        assert RunMeta(connect(db)).last_checkpoint().step == 2
    assert max_difference(outs[64], outs[128]) <= 1e-5


def test_sigterm_stops_gracefully_with_a_durable_checkpoint_and_no_held_leases(tmp_path, tiny_train_target, samples):
    db = new_run(tmp_path, tiny_train_target, samples)
    trainer = run_cli(train_args(db, tmp_path / "out", **{"--epochs": 50, "--save-every": 1000}))
    queue, meta = RefQueue(connect(db)), RunMeta(connect(db))
    wait_until(lambda: queue.counts()["acked"], "the trainer acks a sample", process=trainer, every=0.01)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == 0
    assert "stopped (SIGTERM)" in trainer.stdout.read()
    counts = queue.counts()
    assert counts["trained"] > 0 and counts["acked"] == counts["leased"] == 0 and not meta.run_finished()
    assert meta.last_checkpoint().num_refs == counts["trained"]
