"""`--config run.toml`: per-command sections, command-line flags win, unknown keys are one line; `status`
shows what the run recorded."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.train.testing import build_tiny_target, seed_run, tiny_features

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def toml(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("where", ["before the command", "on the command"])
def test_the_file_sets_defaults_and_a_flag_overrides_them(tmp_path, where):
    config = toml(tmp_path, f'[train]\ndb = "{tmp_path / "empty.sqlite"}"\nwait-for-rollout = 0.2\nprogress = false\n')

    def train(*flags):
        args = ["train", *flags]
        return invoke(*(["--config", config, *args] if where == "before the command" else [*args, "--config", config]))

    assert "within --wait-for-rollout 0.2s" in one_error_line(train("--quiet"))  # db and seconds from the file
    line = one_error_line(train("--quiet", "--wait-for-rollout", "0.3"))
    assert "within --wait-for-rollout 0.3s" in line and "empty.sqlite" in line


@pytest.mark.parametrize("text, says", [
    ("[train]\nlearning-rate = 1e-3\n", "[train] has no option 'learning-rate'"),
    ("[trian]\nlr = 1e-3\n", "unknown section [trian]"),
    ("lr = 1e-3\n", "key 'lr' is outside a section"),
    ("[train\nlr = 1e-3\n", "not readable as TOML"),
])
def test_a_wrong_file_is_one_line_naming_the_key_and_section(tmp_path, text, says):
    config = toml(tmp_path, text)
    assert says in one_error_line(invoke("train", "--config", config, "--db", tmp_path / "r.sqlite"))
    assert says in one_error_line(invoke("--config", config, "status", "--db", tmp_path / "r.sqlite"))
    assert not (tmp_path / "r.sqlite").exists()


def test_a_missing_file_is_one_line(tmp_path):
    assert "no such file" in one_error_line(invoke("eval", "--config", tmp_path / "nope.toml"))


def test_status_shows_the_recorded_config_and_target(tmp_path):
    target = build_tiny_target(tmp_path / "tiny")
    db = tmp_path / "run.sqlite"
    seed_run(db, target, tiny_features(target, [20, 24]), draft_vocab_size=100, store="files",
             store_dir=tmp_path / "store")
    config = toml(tmp_path, "[train]\nlr = 0.003\nttt_length = 2\nbatch-tokens = 64\nwarmup-steps = 1\n"
                            'device = "cpu"\ncompile = false\nprogress = false\nseed = 1\n')
    result = invoke("train", "--config", config, "--db", db, "--out", tmp_path / "out", "--seed", 5)
    assert result.exit_code == 0, result.output
    snap = json.loads(invoke("status", "--db", db, "--json").output)
    recorded = snap["config"]["train"]
    assert (recorded["lr"], recorded["ttt_length"], recorded["batch_tokens"], recorded["seed"]) == (0.003, 2, 64, 5)
    assert snap["target"]["model"] == str(target.resolve())
    table = invoke("status", "--db", db).output
    assert "recorded at the run's start" in table and "lr=0.003" in table and str(target.resolve()) in table


def test_run_hands_the_file_to_both_children(tmp_path):
    from dataflow import testing

    target = testing.build_tiny_target(tmp_path / "tiny")
    config = toml(tmp_path, f'[rollout]\ndataset = "{tmp_path / "missing.jsonl"}"\n[train]\nprogress = false\n')
    done = subprocess.run([sys.executable, "-m", "dataflow", "--config", config, "run", "--db", tmp_path / "run.sqlite",
                           "--target-model", target, "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "`dataflow rollout` failed" in done.stderr and "missing.jsonl: no such file" in done.stderr
