"""CLI smoke tests through typer's CliRunner, plus `dataflow run`'s option routing."""

import json

import click
import pytest
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem, RefQueue
from dataflow.errors import InputError
from dataflow.run import route_options

runner = CliRunner()


def make_run(tmp_path, n=3):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    RefQueue(conn).put_many([RefItem(f"s{i}", {"kind": "test"}, 100, "arena-a") for i in range(n)])
    RunMeta(conn).heartbeat("rollout-0", "rollout", "waiting for trainer")
    return db, conn


def test_status_json_reports_counts_bytes_and_processes(tmp_path):
    db, _ = make_run(tmp_path)
    result = runner.invoke(app, ["status", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    snap = json.loads(result.output)
    assert snap["refs"]["pending"] == 3
    assert snap["in_flight_bytes"] == 300
    assert snap["processes"][0]["status"] == "waiting for trainer"
    assert snap["processes"][0]["alive"] is True


def test_status_table_shows_the_waiting_producer(tmp_path):
    db, _ = make_run(tmp_path)
    result = runner.invoke(app, ["status", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "waiting for trainer" in result.output
    assert "pending 3" in result.output


def test_status_of_a_missing_database_is_one_line_and_nonzero(tmp_path):
    result = runner.invoke(app, ["status", "--db", str(tmp_path / "nope.sqlite")])
    assert result.exit_code == 2
    assert "no such run database" in result.output
    assert not (tmp_path / "nope.sqlite").exists()


def test_a_file_that_is_not_a_database_is_refused_and_left_intact(tmp_path):
    bogus = tmp_path / "notes.sqlite"
    bogus.write_text("my precious notes\n")
    result = runner.invoke(app, ["status", "--db", str(bogus)])
    assert result.exit_code == 2
    assert "not a dataflow database" in result.output
    assert bogus.read_text() == "my precious notes\n"


def test_dead_lists_dead_refs_and_requeue_revives_them(tmp_path):
    db, conn = make_run(tmp_path, n=1)
    queue = RefQueue(conn, max_attempts=1)
    (lease,) = queue.lease("c", 1)
    queue.fail(lease.token, "bad sample", retryable=True)
    result = runner.invoke(app, ["dead", "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert "bad sample" in result.output
    result = runner.invoke(app, ["dead", "--db", str(db), "--requeue"])
    assert "requeued 1 dead refs" in result.output
    assert queue.counts()["pending"] == 1


def fake_command(*options):
    return click.Command("x", params=list(options))


def test_run_routes_each_option_to_the_commands_that_accept_it():
    rollout = fake_command(
        click.Option(["--db"]), click.Option(["--seed"]), click.Option(["--regenerate/--no-regenerate"])
    )
    train = fake_command(click.Option(["--db"]), click.Option(["--seed"]), click.Option(["--lr"]))
    routed = route_options(
        ["--db", "r.sqlite", "--regenerate", "--lr", "3e-4", "--seed=7"], {"rollout": rollout, "train": train}
    )
    assert routed["rollout"] == ["--db", "r.sqlite", "--regenerate", "--seed=7"]
    assert routed["train"] == ["--db", "r.sqlite", "--lr", "3e-4", "--seed=7"]


def test_run_sends_a_role_prefixed_option_to_that_command_only():
    rollout = fake_command(click.Option(["--dtype"]))
    train = fake_command(click.Option(["--dtype"]))
    routed = route_options(["--train-dtype", "bf16", "--rollout-dtype=float32"], {"rollout": rollout, "train": train})
    assert routed == {"rollout": ["--dtype=float32"], "train": ["--dtype", "bf16"]}


def test_run_refuses_an_option_neither_command_knows():
    with pytest.raises(InputError, match="--bogus"):
        route_options(["--bogus", "1"], {"rollout": fake_command(), "train": fake_command()})
