"""The producer keeps its task leases through every long phase, and drops the work of a lease it lost."""

import subprocess
import sys

from conftest import wait_until

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.tasks import TaskQueue
from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig
from dataflow.rollout.producer import run_rollout
from dataflow.rollout.ui import RolloutView

N = 8


def regenerating_rollout(db, target, producer_id, store_dir):
    # A lease group's regeneration (2 replies x 40 tokens) takes longer than the 1 s lease on this tiny CPU
    # target, so only extensions made during the regeneration keep the other rollout from taking it over.
    args = ["--db", str(db), "--target-model", str(target), "--num-samples", str(N), "--threads", "1",
            "--no-progress", "--max-length", "192", "--lease-ttl", "1", "--tasks-per-lease", "2",
            "--regenerate", "--max-new-tokens", "40", "--store", "files", "--store-dir", str(store_dir),
            "--producer-id", producer_id, "--vocab-warmup", "1"]
    return subprocess.Popen([sys.executable, "-m", "dataflow", "rollout", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_regenerating_rollouts_with_a_short_lease_regenerate_each_prompt_once(tmp_path, tiny_target):
    db = tmp_path / "run.sqlite"
    connect(db).close()
    procs = [regenerating_rollout(db, tiny_target, p, tmp_path / "features") for p in ("a", "b")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    conn = connect(db)
    stats = [p.info for p in RunMeta(conn).processes("rollout")]
    # The warm-up sample is regenerated before the tasks exist (its task carries the reply); every other
    # prompt is regenerated under a task lease, once: not one reply written twice.
    assert sum(s["regenerated"] for s in stats) == N - 1, (stats, outputs)
    assert sum(s["lost_leases"] for s in stats) == 0 and sum(s["samples"] for s in stats) == N
    assert TaskQueue(conn).counts() == {"pending": 0, "leased": 0, "done": N, "dead": 0}
    payloads = [r[0] for r in conn.execute("SELECT payload FROM tasks")]
    assert all('"regenerated": true' in p for p in payloads)


class StolenDuringGeneration(HFEngine):
    """Another (fast) rollout takes over one task and finishes it while this one is generating: the task's
    lease had expired meanwhile. The warm-up's generation (before any task exists) is left alone."""

    def __init__(self, config, db):
        super().__init__(config)
        self.db, self.victim_key = db, None

    def generate(self, conversations, **kw):
        thief = connect(self.db)
        victim = thief.execute("SELECT key FROM tasks WHERE payload NOT LIKE '%\"regenerated\": true%'").fetchone()
        if self.victim_key is None and victim is not None:
            self.victim_key = victim["key"]
            thief.execute("UPDATE tasks SET lease_deadline = 0 WHERE key = ?", (self.victim_key,))
            [lease] = TaskQueue(thief).lease("thief", n=1, ttl=600)
            assert lease.key == self.victim_key and TaskQueue(thief).complete(lease.token)
        thief.close()
        return super().generate(conversations, **kw)


def test_a_task_whose_lease_was_taken_over_mid_regeneration_is_dropped_not_published(tmp_path, tiny_target):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    engine = StolenDuringGeneration(HFEngineConfig(model_dir=tiny_target, threads=1), db)
    config = RolloutConfig(num_samples=2, regenerate=True, max_new_tokens=8, tasks_per_lease=2, max_length=192,
                           store="files", store_dir=tmp_path / "features", lease_ttl=60, vocab_warmup=1)
    stats = run_rollout(conn, config, engine, RolloutView(enabled=False))
    # The warm-up sample is published; the other one's lease was lost while its reply was being written.
    assert stats.lost_leases == 1 and stats.regenerated == 0 and stats.samples == 1
    victim = conn.execute("SELECT lease_owner, payload FROM tasks WHERE key = ?", (engine.victim_key,)).fetchone()
    assert victim["lease_owner"] == "thief" and '"regenerated"' not in victim["payload"]  # our reply was not stored
    assert conn.execute("SELECT count(*) FROM refs WHERE key = ?", (engine.victim_key,)).fetchone()[0] == 0
    assert TaskQueue(conn).counts() == {"pending": 0, "leased": 0, "done": 2, "dead": 0}


def test_the_rollout_heartbeats_while_it_prepares_the_run(tmp_path, tiny_target, monkeypatch):
    """The vocab pass over a large dataset takes minutes: the rollout must not look dead meanwhile."""
    import dataflow.rollout.producer as producer

    db = tmp_path / "run.sqlite"
    conn, observer = connect(db), connect(db)
    real_prepare = producer.prepare_run

    def slow_prepare(*args):
        wait_until(lambda: any(p.status.startswith("preparing") for p in RunMeta(observer).processes("rollout")),
                   "a heartbeat says the rollout is preparing the run", timeout=30, every=0.1)
        return real_prepare(*args)

    monkeypatch.setattr(producer, "prepare_run", slow_prepare)
    engine = HFEngine(HFEngineConfig(model_dir=tiny_target, threads=1))
    config = RolloutConfig(num_samples=2, max_length=96, store="files", store_dir=tmp_path / "features")
    assert run_rollout(conn, config, engine, RolloutView(enabled=False)).samples == 2
