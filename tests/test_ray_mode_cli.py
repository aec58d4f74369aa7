"""`dataflow run --ray` options, checked before any Ray start, and the single-host commands staying Ray-free."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.testing import build_tiny_target

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("tiny") / "t", vocab_size=300)


def test_single_host_commands_and_stores_never_import_ray(tmp_path):
    script = f"""
import sys
from typer.testing import CliRunner
from dataflow.cli import app
import dataflow.run, dataflow.rollout.producer, dataflow.train.trainer
from dataflow.transport import open_reader
runner = CliRunner()
assert runner.invoke(app, ["gc", "--db", {str(tmp_path / "run.sqlite")!r}]).exit_code != 0  # no such run
from dataflow.control.db import connect
connect({str(tmp_path / "run.sqlite")!r})
assert runner.invoke(app, ["status", "--db", {str(tmp_path / "run.sqlite")!r}, "--json"]).exit_code == 0
assert runner.invoke(app, ["run", "--help"]).exit_code == 0
open_reader(None).close()
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--rollouts", "0"], "--rollouts and --trainers must be >= 1"),
        (["--gpus-per-trainer", "-1"], "--cpus/gpus-per-* must be >= 0"),
        (["--store", "files", "--store-dir", "x"], "features go through Ray's object store"),
        (["--train-epochs", "3"], "pass --epochs 3 to the rollouts instead"),
        (["--trainers", "2"], "need --ray ADDRESS|auto|local"),
        (["--engine", "tgi"], "--engine 'tgi': unknown engine"),
    ],
)
def test_bad_ray_options_fail_with_one_line_before_ray_starts(tmp_path, target, options, message):
    import ray

    db = tmp_path / "run.sqlite"
    ray_address = [] if "need --ray" in message else ["--ray", "local"]
    result = CliRunner().invoke(app, ["run", "--db", str(db), *ray_address, "--target-model", str(target), *options])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not ray.is_initialized() and not db.exists()
