"""`dataflow train` and `dataflow plot` from the command line: waiting, idling, clear errors, outputs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import wait_until
from safetensors import safe_open
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.train.testing import seed_run, tiny_features

runner = CliRunner()
QUICK = ["--lr", "3e-3", "--warmup-steps", "1", "--ttt-length", "2", "--batch-tokens", "64", "--log-every", "1",
         "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def samples(tiny_train_target):
    return tiny_features(tiny_train_target, [20, 24, 16, 28])


def seeded(tmp_path, target, samples, **kwargs):
    db = tmp_path / "run.sqlite"
    seed_run(db, target, samples, draft_vocab_size=100, store="files", store_dir=tmp_path / "store", **kwargs)
    return db


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_waits_with_a_message_until_the_rollout_records_the_vocab(tmp_path, tiny_train_target, samples):
    db = tmp_path / "run.sqlite"
    connect(db).close()  # a run the rollout has not prepared yet
    cmd = [sys.executable, "-m", "dataflow", "train", "--db", db, "--out", tmp_path / "out", *QUICK]
    trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meta = RunMeta(connect(db))
    wait_until(lambda: any(p.status.startswith("waiting for the rollout to record") for p in meta.processes(role="train")),
               "the trainer says it waits for the vocab", process=trainer)
    seeded(tmp_path, tiny_train_target, samples)
    assert trainer.wait(timeout=120) == 0, trainer.stdout.read()
    assert meta.run_finished() and (tmp_path / "out" / "final" / "config.json").exists()


def test_train_gives_up_after_exit_when_idle_with_no_rollout_alive(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples, end_of_stream=False)
    result = invoke("train", "--db", db, "--out", tmp_path / "out", "--exit-when-idle", "0.2", *QUICK)
    assert result.exit_code == 0, result.output
    assert "stopped (idle)" in result.output
    meta = RunMeta(connect(db))
    assert not meta.run_finished() and meta.last_checkpoint().step == 2  # what it trained is durable


def test_an_unwritable_output_dir_is_one_clear_error(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    (tmp_path / "taken").write_text("a file, not a dir")
    result = invoke("train", "--db", db, "--out", tmp_path / "taken" / "out", *QUICK)
    assert result.exit_code != 0
    assert result.output.startswith("error: output dir") and "pass --out a writable dir" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_vocab_record_of_a_newer_dataflow_is_one_clear_error(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    meta = RunMeta(connect(db))
    meta.set("vocab", {**meta.get("vocab"), "version": 2})
    result = invoke("train", "--db", db, "--out", tmp_path / "out", *QUICK)
    assert result.exit_code != 0
    assert result.output.startswith("error: run meta 'vocab': record version 2, but this dataflow reads version 1")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("override, says", [({"hidden_size": 32}, "embeddings are 64 wide"),
                                            ({"target_hidden_size": 32}, "features are 64 wide"),
                                            ({"hiden_size": 32}, "unknown keys")])
def test_a_draft_config_inconsistent_with_the_run_is_one_clear_error(tmp_path, tiny_train_target, samples, override, says):
    db = seeded(tmp_path, tiny_train_target, samples)
    (tmp_path / "draft.json").write_text(json.dumps(override))
    result = invoke("train", "--db", db, "--out", tmp_path / "out", "--draft-config", tmp_path / "draft.json", *QUICK)
    assert result.exit_code != 0 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_restarting_with_another_learning_rate_is_refused(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    assert invoke("train", "--db", db, "--out", tmp_path / "out", *QUICK).exit_code == 0
    result = invoke("train", "--db", db, "--out", tmp_path / "out", *QUICK, "--lr", "1e-3")
    assert result.exit_code != 0 and "--lr 0.003 (now 0.001)" in result.output, result.output


def test_bf16_training_exports_bf16_weights_and_the_plot_shows_the_curves(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    result = invoke("train", "--db", db, "--out", tmp_path / "out", "--dtype", "bf16", "--epochs", "3", *QUICK)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and {"loss", "acc_0", "acc_1"} <= rows[0].keys()
    assert list((tmp_path / "out" / "tensorboard").iterdir())
    result = invoke("plot", tmp_path / "out")
    assert result.exit_code == 0 and os.path.getsize(tmp_path / "out" / "metrics.png") > 10_000
    with safe_open(tmp_path / "out" / "final" / "model.safetensors", framework="pt") as f:
        assert str(f.get_tensor("fc.weight").dtype) == "torch.float32"  # the target's dtype, not the compute dtype


def test_report_to_chooses_the_trackers_and_a_missing_or_unknown_one_is_one_line(tmp_path, tiny_train_target, samples):
    db = seeded(tmp_path, tiny_train_target, samples)
    result = invoke("train", "--db", db, "--out", tmp_path / "out", "--report-to", "none", *QUICK)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "tensorboard").exists()

    unknown = invoke("train", "--db", db, "--out", tmp_path / "out", "--report-to", "tensorboard,mlflow", *QUICK)
    assert unknown.exit_code == 2 and "--report-to tensorboard,mlflow: unknown ['mlflow']" in unknown.output
    try:
        import wandb  # noqa: F401
    except ImportError:
        (tmp_path / "w").mkdir()
        fresh = seeded(tmp_path / "w", tiny_train_target, samples)
        missing = invoke("train", "--db", fresh, "--out", tmp_path / "w" / "out", "--report-to", "wandb", *QUICK)
        assert missing.exit_code == 2 and "wandb is not installed; `pip install wandb`" in missing.output
