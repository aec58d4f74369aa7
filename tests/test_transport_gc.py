import json

import pytest
from test_transport_support import leftover_segments, produce, run_db, sample, spawn  # noqa: F401
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.transport import open_writer, sweep, usage


@pytest.fixture
def conn(run_db):
    conn = connect(run_db)
    yield conn
    conn.close()


def crashed_producer(db, keys):
    process = spawn(produce, db, "p0", keys, 1 << 16)
    process.join(60)
    assert process.exitcode == 0


def test_gc_keeps_a_dead_producers_arena_until_its_samples_are_consumed(conn, run_db):
    crashed_producer(run_db, ["a", "b"])
    run_id = RunMeta(conn).run_id
    report = sweep(conn)
    assert report.removed_segments == [] and "not consumed" in report.kept_segments[0]
    [arena] = usage(conn)
    assert arena["kind"] == "shm" and arena["live_bytes"] > 0 and arena["capacity"] == 1 << 16
    queue = RefQueue(conn)
    queue.ack([lease.token for lease in queue.lease("t", n=2)])
    assert sweep(conn, dry_run=True).removed_segments and leftover_segments(run_id)
    assert sweep(conn).removed_segments == [f"dataflow-{run_id[:12]}-p0"]
    assert not leftover_segments(run_id)


def test_gc_never_removes_the_arena_of_a_running_producer(conn):
    writer = open_writer(conn, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    assert "running" in sweep(conn).kept_segments[0]
    writer.close()


def test_gc_removes_everything_of_the_run_once_training_finished(conn, run_db):
    crashed_producer(run_db, ["a"])
    RunMeta(conn).set_train_finished()
    assert len(sweep(conn).removed_segments) == 1
    assert not leftover_segments(RunMeta(conn).run_id)


def test_gc_leaves_other_runs_alone(conn, tmp_path):
    other = connect(tmp_path / "other.sqlite")
    writer = open_writer(other, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    writer.write("a", sample("a"))
    assert sweep(conn).removed_segments == [] and writer.path.exists()
    writer.close()
    assert not leftover_segments(RunMeta(other).run_id)


def test_the_gc_command_reports_what_it_removed(conn, run_db):
    crashed_producer(run_db, [])
    result = CliRunner().invoke(app, ["gc", "--db", str(run_db), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["removed_segments"] == [f"dataflow-{RunMeta(conn).run_id[:12]}-p0"]
    result = CliRunner().invoke(app, ["gc", "--db", str(run_db)])
    assert result.exit_code == 0 and "removed 0 arenas" in result.output


def test_the_gc_command_refuses_a_missing_database(tmp_path):
    result = CliRunner().invoke(app, ["gc", "--db", str(tmp_path / "nope.sqlite")])
    assert result.exit_code != 0 and "no such run database" in result.output


def test_gc_removes_arenas_of_runs_whose_database_is_gone_but_never_a_live_producers(conn, tmp_path):
    gone_db = tmp_path / "gone" / "run.sqlite"
    gone_db.parent.mkdir()
    crashed_producer(gone_db, ["a"])
    gone_run = RunMeta(connect(gone_db)).run_id
    alive_db = connect(tmp_path / "alive.sqlite")
    writer = open_writer(alive_db, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    for suffix in ("", "-wal", "-shm"):
        (gone_db.parent / f"run.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "alive.sqlite").unlink()  # its producer still runs: its arena stays
    report = sweep(conn)
    assert f"dataflow-{gone_run[:12]}-p0" in report.removed_orphans
    assert report.removed_segments == [] and report.kept_segments == []
    assert not leftover_segments(gone_run) and writer.path.exists()
    writer.close()
