import json
import os
import subprocess
import sys

import pytest
from conftest import leftover_segments
from test_transport_support import matches, produce, sample, spawn, tokens_for
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.errors import StoreError
from dataflow.transport import open_reader, open_writer, sweep, usage
from dataflow.transport.segment import SHM_DIR


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


def test_gc_never_removes_bytes_live_refs_point_to_even_once_the_run_is_marked_finished(conn, run_db):
    crashed_producer(run_db, ["a"])
    RunMeta(conn).set_run_finished()
    assert sweep(conn).removed_segments == []
    queue = RefQueue(conn)
    [lease] = queue.lease("t")
    assert matches("a", open_reader(conn).open(lease.handle), tokens_for("a"))
    queue.ack([lease.token])
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


def consume_all(db):
    """Act as the run's trainer: read every pending sample, ack it; returns which ones were intact."""
    conn = connect(db)
    queue = RefQueue(conn)
    reader, leases = open_reader(conn), queue.lease("check", n=100)
    intact = {lease.key: matches(lease.key, reader.open(lease.handle), tokens_for(lease.key)) for lease in leases}
    queue.ack([lease.token for lease in leases])
    reader.close()
    conn.close()
    return intact


def test_gc_keeps_another_runs_arena_whose_database_moved_and_removes_it_only_with_all_orphans(conn, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    crashed_producer(other_dir / "run.sqlite", ["a", "b"])
    other_run = RunMeta(connect(other_dir / "run.sqlite")).run_id
    moved = other_dir.rename(tmp_path / "moved")  # the run directory moved (or is in another container)
    alive = connect(tmp_path / "alive.sqlite")
    writer = open_writer(alive, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)

    report = sweep(conn)
    assert report.removed_orphans == [] and leftover_segments(other_run)
    assert any(f"dataflow-{other_run[:12]}-p0" in kept for kept in report.kept_orphans)
    assert "--all-orphans" in report.summary()
    assert consume_all(moved / "run.sqlite") == {"a": True, "b": True}  # the moved run still has its samples

    result = CliRunner().invoke(app, ["gc", "--db", str(tmp_path / "alive.sqlite"), "--all-orphans", "--json"])
    assert result.exit_code == 0, result.output
    assert f"dataflow-{other_run[:12]}-p0" in json.loads(result.output)["removed_orphans"]
    assert not leftover_segments(other_run) and writer.path.exists()  # a live producer's arena stays
    writer.close()


def test_gc_removes_another_runs_arena_once_that_run_is_provably_finished(conn, tmp_path):
    other_db = tmp_path / "other.sqlite"
    crashed_producer(other_db, ["a"])
    other = connect(other_db)
    assert sweep(conn).removed_orphans == []
    RunMeta(other).set_run_finished()
    assert sweep(conn).removed_orphans == [f"dataflow-{RunMeta(other).run_id[:12]}-p0"]


def test_a_copied_database_neither_writes_reads_nor_sweeps_its_originals_arena(conn, run_db, tmp_path):
    crashed_producer(run_db, ["a", "b"])
    copy_db = tmp_path / "copy.sqlite"
    copy = connect(copy_db)
    conn.backup(copy)  # same run id, another database
    assert RunMeta(copy).run_id == RunMeta(conn).run_id
    report = sweep(copy)
    assert report.removed_segments == [] and f"dataflow-{RunMeta(conn).run_id[:12]}-p0" not in report.removed_orphans
    with pytest.raises(StoreError, match="copy of this database"):
        open_writer(copy, store="shm", producer_id="p0", max_inflight_bytes=1 << 16)
    [lease] = RefQueue(copy).lease("copy-trainer", n=1)
    with pytest.raises(StoreError, match="copy of this database"):
        open_reader(copy).open(lease.handle)
    assert consume_all(run_db) == {"a": True, "b": True}  # the original's samples are untouched
    assert len(sweep(conn).removed_segments) == 1


def test_a_dev_shm_file_of_another_user_is_skipped_and_mentioned(conn, run_db, tmp_path):
    """Runs as a user who cannot open the file: a user namespace where the file's owner is unmapped."""
    foreign = SHM_DIR / f"dataflow-{'f' * 12}-someone"
    foreign.write_bytes(b"x" * 4096)
    try:
        os.chown(foreign, 54321, 54321)
        foreign.chmod(0)
        script = (
            "import sys; from dataflow.control.db import connect; from dataflow.transport import sweep; "
            "print(sweep(connect(sys.argv[1])).summary())"
        )
        result = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script, str(run_db)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"skipped {foreign}: not readable by this user" in result.stdout
        assert foreign.exists()
    finally:
        foreign.unlink()
