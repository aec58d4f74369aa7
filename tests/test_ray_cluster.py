"""`dataflow run --ray` on a simulated multi-node cluster (several raylets on this host, one CPU each, so
every actor gets a node of its own): a run completes, and one survives losing a rollout node and a
trainer node mid-run with every ref trained exactly once."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import wait_until

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from dataflow.control.db import connect  # noqa: E402
from dataflow.control.meta import RunMeta  # noqa: E402
from dataflow.control.queue import RefQueue  # noqa: E402
from dataflow.control.tasks import TaskQueue  # noqa: E402

SAMPLES = 32
WORKER_NODES = 5  # two rollouts, two trainer ranks, one spare for a trainer group that moves
WAIT_S = 240.0  # a Ray cluster of six raylets on 2 cores starts slowly (150 s timed out with both cores busy)
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH,
                                                            "include_dashboard": False})
    for _ in range(WORKER_NODES):
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def run_command(db, target, address, *extra):
    """Paced: one sample per step and room for ~4 in flight per rollout, so stops and kills land mid-run."""
    return [
        sys.executable, "-m", "dataflow", "run", "--db", str(db), "--ray", address,
        "--rollouts", "2", "--trainers", "2", "--target-model", str(target),
        "--num-samples", str(SAMPLES), "--max-length", "64", "--draft-vocab-size", "256", "--threads", "1",
        "--tasks-per-lease", "2", "--token-budget", "128", "--batch-tokens", "64", "--ttt-length", "2",
        "--save-every", "1", "--lease-ttl", "5", "--fill-wait", "0.2",
        "--max-inflight-bytes", "300000", *extra,
    ]


def nodes_of(meta: RunMeta) -> dict[str, str]:
    """process id -> the Ray node id prefix its last heartbeat came from."""
    return {p.id: p.info["node"].split()[1] for p in meta.processes() if "node" in p.info}


def assert_trained_exactly_once(conn) -> None:
    counts = RefQueue(conn).counts()
    assert counts["trained"] == SAMPLES and counts["dead"] == 0, counts
    # A ref moves ACKED -> TRAINED once, counted by the checkpoint that moved it: no ref was counted twice.
    assert conn.execute("SELECT sum(num_refs) FROM checkpoints").fetchone()[0] == SAMPLES
    trained_keys = "SELECT key FROM refs WHERE state = 3 UNION SELECT key FROM compacted_refs"  # compaction keeps keys
    assert conn.execute(f"SELECT count(*) FROM ({trained_keys})").fetchone()[0] == SAMPLES


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(1000)  # its own waits add up to 840 s on a loaded 2-core machine
def test_rollouts_and_a_trainer_group_on_separate_nodes_stop_on_ctrl_c_and_resume_to_train_every_sample_once(
    tmp_path, cluster, tiny_target
):
    db = tmp_path / "run.sqlite"
    first = subprocess.Popen(run_command(db, tiny_target, cluster.address), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    wait_until(db.exists, "the run database exists", process=first, timeout=WAIT_S)
    conn = connect(db)
    meta, queue = RunMeta(conn), RefQueue(conn)
    wait_until(lambda: queue.counts()["acked"] + queue.counts()["trained"] > 0, "a sample is trained", process=first,
               timeout=WAIT_S)
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130, first.stderr.read()[-3000:]
    statuses = {p.id: p.status for p in meta.processes()}
    assert statuses["train-0"].startswith("stopped") and statuses["train-1"].startswith("stopped"), statuses
    assert statuses["rollout-r0"] == statuses["rollout-r1"] == "interrupted", statuses
    # Handed back at once, not left to expire: nothing is leased once the run has stopped.
    assert queue.counts()["leased"] == 0 and TaskQueue(conn).counts()["leased"] == 0
    assert not meta.run_finished()

    done = subprocess.run(run_command(db, tiny_target, cluster.address), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_trained_exactly_once(conn)
    nodes = nodes_of(meta)
    assert set(nodes) == {"rollout-r0", "rollout-r1", "train-0", "train-1"}
    assert len(set(nodes.values())) == 4, nodes  # each on a node of its own; the gloo group spans two
    assert meta.run_finished()


@pytest.mark.slow
@pytest.mark.timeout(1500)  # its own waits add up to 1,410 s on a loaded 2-core machine
def test_losing_rollout_and_trainer_nodes_then_the_ledger_loses_nothing_and_trains_nothing_twice(
    tmp_path, cluster, tiny_target
):
    db = tmp_path / "run.sqlite"
    proc = subprocess.Popen(run_command(db, tiny_target, cluster.address),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ray.init(address=cluster.address, namespace="dataflow", log_to_driver=False)
    try:
        wait_until(db.exists, "the run database exists", process=proc, timeout=WAIT_S)
        conn = connect(db)
        meta, queue = RunMeta(conn), RefQueue(conn)
        by_id = {node.node_id[:8]: node for node in cluster.list_all_nodes()}
        killed = {}

        def kill(process_id: str) -> None:
            killed[process_id] = nodes_of(meta)[process_id]
            cluster.remove_node(by_id[killed[process_id]], allow_graceful=False)

        # r1 has published samples; its node goes with them (and with its leased prompts).
        wait_until(lambda: conn.execute("SELECT count(*) FROM refs WHERE store LIKE '%-r1'").fetchone()[0] >= 2,
                   "rollout r1 published two samples", process=proc, timeout=WAIT_S)
        kill("rollout-r1")
        # Training is under way (a checkpoint exists); rank 1's node goes, the group re-forms on the nodes left.
        wait_until(lambda: queue.counts()["trained"] > 0 and "train-1" in nodes_of(meta), "a checkpoint with rank 1 up",
                   process=proc, timeout=WAIT_S)
        kill("train-1")
        wait_until(lambda: nodes_of(meta)["train-1"] != killed["train-1"], "rank 1 re-forms on another node",
                   process=proc, timeout=WAIT_S)
        ray.kill(ray.get_actor(f"dataflow-{meta.run_id[:12]}-ledger"))
        assert proc.wait(timeout=120) != 0
        assert "ledger actor" in one_line_error(proc.stderr.read())
    finally:
        ray.shutdown()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=90)
    assert queue.counts()["trained"] < SAMPLES
    statuses = {p.id: p.status for p in meta.processes()}
    assert statuses["rollout-r1"].startswith("stopped"), statuses  # said for it by the driver

    # Three nodes are left: one rollout and the trainer group resume from the database.
    resumed = run_command(db, tiny_target, cluster.address, "--rollouts", "1")
    done = subprocess.run(resumed, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_trained_exactly_once(conn)
    assert os.path.isdir(tmp_path / "run.train" / "final")
