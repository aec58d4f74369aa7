"""`dataflow dead`: dead refs and dead prompt tasks, listed with their last error and requeued."""

from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control.db import connect
from dataflow.control.queue import RefItem, RefQueue
from dataflow.control.tasks import TaskQueue

runner = CliRunner()


def test_dead_lists_and_requeues_dead_prompt_tasks_beside_dead_refs(tmp_path):
    db = tmp_path / "run.sqlite"
    conn = connect(db)
    tasks, refs = TaskQueue(conn, max_attempts=1), RefQueue(conn, max_attempts=1)
    tasks.add_many([("p0", {"prompt": "a"}), ("p1", {"prompt": "b"})])
    (bad, good) = tasks.lease("rollout", n=2)
    tasks.fail(bad.token, "chat template: roles must alternate")
    tasks.complete(good.token, [RefItem("p1", {"kind": "test"}, 8, "s")])
    refs.fail(refs.lease("trainer")[0].token, "nan loss")

    listed = runner.invoke(app, ["dead", "--db", str(db)])
    assert listed.exit_code == 0, listed.output
    assert "dead prompt tasks (1)" in listed.output and "roles must alternate" in listed.output
    assert "dead refs (1)" in listed.output and "nan loss" in listed.output

    requeued = runner.invoke(app, ["dead", "--db", str(db), "--requeue"])
    assert "requeued 1 dead refs and 1 dead prompt tasks" in requeued.output
    assert [t.key for t in tasks.lease("rollout-restarted")] == ["p0"]  # a rollout produces it again
    assert tasks.dead() == [] and refs.dead() == []
