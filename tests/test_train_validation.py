"""--validation-share: held-out prompts are never trained on, and the draft is measured on them while it trains."""

import json
import subprocess
import sys

import pytest
from test_train_loop import DRAFT_VOCAB, final_weights, max_difference, new_run, samples  # noqa: F401 (fixture)

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.keys import copy_id, epoch_key
from dataflow.train.checkpoint import read_training_state
from dataflow.train.config import TrainConfig, TrainOptions
from dataflow.train.plot import plot_metrics, read_metrics
from dataflow.train.testing import seed_run
from dataflow.train.trainer import train
from dataflow.train.validation import held_out
from dataflow.ui import draft_line

SHARE = 0.3  # holds out samples "0" and "7" of the 8 (checked below)


def test_a_prompt_is_held_out_with_all_its_replies_and_epochs():
    prompts = [f"row{i}" for i in range(2000)] + [f"@self{i}" for i in range(2000)]
    held = [p for p in prompts if held_out(p, 0.1)]
    assert 0.08 * len(prompts) < len(held) < 0.12 * len(prompts)
    for p in prompts[:200] + prompts[-200:]:
        keys = [epoch_key(copy_id(p, c), e) for c in range(3) for e in range(3)]
        assert {held_out(k, 0.1) for k in keys} == {p in held}, keys
    assert not any(held_out(p, 0.0) for p in prompts)


def test_holding_prompts_out_trains_the_same_draft_as_never_publishing_them(tmp_path, tiny_train_target, samples):
    held = [i for i in range(len(samples)) if held_out(str(i), SHARE)]
    assert 0 < len(held) < len(samples) // 2
    # One sample per step and a flat lr: a held-out sample's step is skipped, and nothing else differs.
    config = dict(lr=3e-3, warmup=0.0, decay="none", ttt_length=3, batch_tokens=32)
    db = new_run(tmp_path, tiny_train_target, samples, name="held")
    train(db, TrainConfig(**config, validation_share=SHARE),
          TrainOptions(out=tmp_path / "out-held", validate_every=2, save_every=3, log_every=1, progress=False,
                       compile=False))
    kept = [s for i, s in enumerate(samples) if i not in held]
    kept_db = tmp_path / "kept.sqlite"  # the same draft vocabulary: counted on all the samples
    seed_run(kept_db, tiny_train_target, kept, draft_vocab_size=DRAFT_VOCAB, store_dir=tmp_path / "kept-store",
             vocab_samples=samples)
    train(kept_db, TrainConfig(**config),
          TrainOptions(out=tmp_path / "out-kept", log_every=1, progress=False, compile=False))
    assert max_difference(final_weights(tmp_path / "out-held"), final_weights(tmp_path / "out-kept")) <= 1e-6

    meta = RunMeta(connect(db))
    counts = RefQueue(meta.conn).counts()
    # Held out, yet consumed; "7" was acked after the checkpoint of the last step (6): not left ACKED.
    assert meta.run_finished() and (counts["trained"], counts["acked"]) == (len(samples), 0), counts
    state = read_training_state(meta.last_checkpoint().path)
    assert (state["samples"], state["held_out"]) == (len(kept), 1)  # written at step 6, before "7" came
    rows = read_metrics(tmp_path / "out-held")
    measured = [r for r in rows if "val_tau_hat" in r]
    # Every 2 steps, and at the end: "7" came last, alone, after the measurement at step 6 (no step of its own).
    assert [(r["step"], r["val_samples"]) for r in measured] == [(2, 1), (4, 1), (6, 1), (6, 2)]
    assert all(1.0 <= r["val_tau_hat"] <= 4.0 and 0.0 <= r["val_acc_0"] <= 1.0 for r in measured)
    (trainer,) = meta.processes(role="train")
    assert trainer.info["val_tau_hat"] == pytest.approx(measured[-1]["val_tau_hat"], abs=1e-4)
    assert "held-out tau-hat" in draft_line(trainer.info)  # what `status` shows
    assert plot_metrics(tmp_path / "out-held").stat().st_size > 0  # the held-out rows have no loss column


def test_later_epochs_keep_one_copy_and_the_curve_script_reads_both_series(tmp_path, tiny_train_target, samples):
    db = tmp_path / "run.sqlite"
    seed_run(db, tiny_train_target, samples, draft_vocab_size=DRAFT_VOCAB, store_dir=tmp_path / "store")
    options = TrainOptions(out=tmp_path / "out", epochs=3, validate_every=3, log_every=1, progress=False, compile=False)
    train(db, TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=3, batch_tokens=64, validation_share=SHARE), options)
    measured = [r for r in read_metrics(tmp_path / "out") if "val_tau_hat" in r]
    held_tokens = len(samples[0]["input_ids"]) + len(samples[7]["input_ids"])
    assert measured and (measured[-1]["val_samples"], measured[-1]["val_tokens"]) == (2, held_tokens)
    state = read_training_state(RunMeta(connect(db)).last_checkpoint().path)
    assert (state["samples"], state["held_out"]) == (3 * 6, 3 * 2)

    out = subprocess.run([sys.executable, "scripts/learning_curve.py", str(tmp_path / "out"), "--k", "3",
                          "--out", str(tmp_path / "curve")], capture_output=True, text=True, check=True)
    final = json.loads(out.stdout.splitlines()[-1])
    assert final["held_out_tau_hat"] == pytest.approx(measured[-1]["val_tau_hat"], abs=1e-4)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert len(curve["held_out_tau_hat"]) == len(measured) and len(curve["tau_hat"]) > len(measured)
    tokens = [p["trained_tokens"] for p in curve["tau_hat"]]
    assert tokens == sorted(tokens) and tokens[-1] == pytest.approx(state["tokens"], rel=0.02)


def test_a_share_of_one_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dataflow", "train", "--db", str(tmp_path / "r.sqlite"),
                             "--validation-share", "1"], capture_output=True, text=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: dataflow train: --validation-share must be in [0, 1), got 1.0"], result.stderr
