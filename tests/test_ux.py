"""What a newcomer sees: no silent waits, log lines without a terminal, inputs checked before work starts."""

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from dataflow import testing as rollout_testing
from dataflow.cli import app

from test_train_cli import QUICK, samples, seeded  # noqa: F401 (samples: a fixture shared with the train CLI tests)

runner = CliRunner()


def dataflow(*args, cwd):
    """`dataflow ARGS` as a child without a terminal: stdin, stdout and stderr are not TTYs."""
    return subprocess.Popen([sys.executable, "-m", "dataflow", *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_trainer_on_a_mistyped_db_says_at_once_what_it_waits_for_and_gives_up_when_told(tmp_path):
    started = time.monotonic()
    trainer = dataflow("train", "--db", "typo.sqlite", "--wait-for-rollout", "1", cwd=tmp_path)
    first = trainer.stderr.readline()
    said_after = time.monotonic() - started
    rest = trainer.stderr.read()
    assert trainer.wait(timeout=120) == 2, first + rest
    assert "typo.sqlite: no such run yet" in first and "dataflow rollout --db typo.sqlite" in first
    assert said_after < 5.0, f"the first line took {said_after:.1f}s"  # before torch loads; ~0.7s on a busy host
    assert "Ctrl-C to stop" in rest and "it gives up after 1s" in rest
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "within --wait-for-rollout 1s; check --db" in errors[0], rest


def test_a_trainer_without_a_terminal_logs_a_plain_line_every_log_every_steps(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    trainer = dataflow("train", "--db", db, "--out", tmp_path / "out", "--epochs", "2", *QUICK, cwd=tmp_path)
    out, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err
    steps = [line for line in err.splitlines() if " INFO step " in line]
    assert len(steps) >= 2, err
    for field in ("loss ", "acc_0 ", "tokens/s", "data-wait "):
        assert field in steps[0], steps[0]
    assert any(" INFO finished: step" in line for line in err.splitlines()), err
    status = json.loads(runner.invoke(app, ["status", "--db", str(db), "--json"]).output)
    (train,) = [p for p in status["processes"] if p["role"] == "train"]
    assert train["status"] == "finished" and train["alive"] is False  # at once, not after a stale heartbeat


def test_quiet_keeps_the_step_lines_and_messages_out_of_the_log(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    result = runner.invoke(app, ["train", "--db", str(db), "--out", str(tmp_path / "out"), "--quiet", *QUICK])
    assert result.exit_code == 0, result.output
    assert " step " not in result.output and "finished" not in result.output, result.output


def error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def rollout(db, *args):
    return runner.invoke(app, ["rollout", "--db", str(db), "--no-progress", "--store", "files",
                               "--store-dir", str(db.parent / "features"), *map(str, args)])


def unloadable_target(tmp_path):
    """Passes the path checks (config.json, weights) but fails in from_pretrained."""
    model_dir = tmp_path / "target"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    (model_dir / "model.safetensors").write_bytes(b"")
    return model_dir


@pytest.mark.parametrize("row, says", [('{"conversations": [', "d.jsonl:2: invalid JSON"),
                                       (None, "d.jsonl: no such file")])
def test_a_bad_dataset_is_refused_before_the_target_loads_and_creates_nothing(tmp_path, row, says):
    broken_target = unloadable_target(tmp_path)  # a dataset error must come before the load fails
    if row is not None:
        good = '{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
        (tmp_path / "d.jsonl").write_text(good + "\n" + row + "\n")
    line = error_line(rollout(tmp_path / "r.sqlite", "--target-model", broken_target, "--dataset", tmp_path / "d.jsonl",
                              "--held-out", 0))
    assert says in line
    assert not (tmp_path / "r.sqlite").exists() and not (tmp_path / "features").exists()


def test_a_target_that_fails_to_load_creates_no_database(tmp_path):
    broken_target = unloadable_target(tmp_path)
    assert "cannot load it" in error_line(rollout(tmp_path / "r.sqlite", "--target-model", broken_target))
    assert not (tmp_path / "r.sqlite").exists()


def test_device_auto_runs_the_rollout_on_what_is_there(tmp_path):
    tiny = rollout_testing.build_tiny_target(tmp_path / "tiny")
    result = rollout(tmp_path / "r.sqlite", "--target-model", tiny, "--device", "auto", "--num-samples", 2,
                     "--held-out", 2)
    assert result.exit_code == 0, result.output
    assert "rollout: " in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, says", [
    (["train", "--device", "gpu"], "Invalid value for '--device': 'gpu': pass auto, cpu, cuda or cuda:N"),
    (["rollout", "--device", "cuda:x"], "'cuda:x': pass auto, cpu, cuda or cuda:N"),
    (["rollout", "--dtype", "fp16"], "'fp16' is not one of 'auto', 'fp32', 'bf16', 'float32', 'bfloat16'"),
    (["rollout", "--max-inflight-bytes", "4XB"], "pass bytes with a unit, e.g. 4GiB"),
    (["train", "--bogus"], "No such option: --bogus"),
])
def test_a_usage_error_is_one_line_and_creates_nothing(tmp_path, args, says):
    line = error_line(runner.invoke(app, [*args, "--db", str(tmp_path / "r.sqlite")]))
    assert says in line and line.endswith(f"{args[0]} --help`"), line
    assert not (tmp_path / "r.sqlite").exists()


def test_a_missing_required_option_is_one_line():
    assert "Missing option '--draft'" in error_line(runner.invoke(app, ["eval"]))


def test_eval_with_zero_draft_tokens_is_one_line(tmp_path):
    assert "num_draft_tokens must be >= 1" in error_line(runner.invoke(app, ["eval", "--draft", str(tmp_path), "-k", "0"]))
