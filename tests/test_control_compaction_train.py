"""The trainer compacts after each checkpoint, and that changes nothing it trains: a real tiny run, with every
checkpoint treated as older than the rate window, gives the same weights as one that compacts nothing."""

from __future__ import annotations

import pytest
import torch

from dataflow.control.db import connect
from dataflow.control.queue import RefQueue
from dataflow.train.checkpoint import read_export
from dataflow.train.config import TrainConfig, TrainOptions
from dataflow.train.testing import build_tiny_target, seed_run, tiny_features
from dataflow.train import trainer
from dataflow.train.trainer import train
from dataflow.transport import gc

DRAFT_VOCAB = 160
SAMPLES = 6
EPOCHS = 3


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return build_tiny_target(tmp_path_factory.mktemp("target") / "tiny")


def train_run(tmp_path, target, name: str) -> tuple[RefQueue, dict[str, torch.Tensor]]:
    db = tmp_path / f"{name}.sqlite"
    seed_run(db, target, tiny_features(target, [24, 32, 20, 28, 16, 30]), draft_vocab_size=DRAFT_VOCAB,
             store="files", store_dir=tmp_path / f"{name}-store")
    config = TrainConfig(lr=3e-3, warmup_steps=2, ttt_length=2, batch_tokens=64)
    options = TrainOptions(out=tmp_path / f"out-{name}", epochs=EPOCHS, save_every=1, progress=False)
    assert train(db, config, options) == "finished"
    return RefQueue(connect(db)), read_export(tmp_path / f"out-{name}" / "final")[1]


def test_compacting_after_every_checkpoint_trains_the_same_weights_and_keeps_the_first_epoch(
    tmp_path, target, monkeypatch
):
    plain, plain_weights = train_run(tmp_path, target, "plain")
    assert plain.compacted() == 0  # its checkpoints are all younger than the rate window
    monkeypatch.setattr(gc, "RATE_WINDOW_S", -3600.0)  # every checkpoint counts as old enough
    after_checkpoints: list[int] = []
    monkeypatch.setattr(trainer, "compact_trained",
                        lambda *args, **kwargs: after_checkpoints.append(gc.compact_trained(*args, **kwargs)))
    compacted, compacted_weights = train_run(tmp_path, target, "compacted")
    assert sum(after_checkpoints) == SAMPLES * (EPOCHS - 1)  # all of it by the trainer, as it checkpointed
    assert compacted.counts() == plain.counts() and compacted.counts()["trained"] == SAMPLES * EPOCHS
    # the replayed epochs went (the last checkpoint's too: the trainer compacts after recording it); the
    # files store's first epoch stays for a later `train --epochs`
    assert compacted.compacted() == SAMPLES * (EPOCHS - 1)
    assert len(compacted.consumed_items(without="#")) == SAMPLES
    assert compacted.keys_containing("#e") == plain.keys_containing("#e")
    for name, weight in plain_weights.items():
        assert torch.equal(weight, compacted_weights[name]), name
