"""The run's target and vocab records: one encoder and one decoder each, versioned, and the records that
runs wrote before records had a version still read."""

import pytest

from dataflow.control.meta import RunMeta
from dataflow.errors import InputError
from dataflow.records import TargetRecord, VocabRecord, read_target, read_vocab, write_target, write_vocab_once
from dataflow.train.build import build_draft, wait_for_records
from dataflow.train.config import TrainConfig
from dataflow.train.testing import target_record

# Exactly what the rollout recorded before records had a version (rollout/prepare.py then).
UNVERSIONED_TARGET = {"model": "/models/tiny", "hidden_size": 64, "vocab_size": 320, "num_hidden_layers": 4,
                      "aux_layers": [1, 2, 1], "dtype": "float32", "max_length": 512}
UNVERSIONED_VOCAB = {"draft_vocab_size": 3, "d2t": [3, 49, 88], "counted_tokens": 23, "distinct_counted": 4,
                     "coverage": 0.95652, "counted_samples": 6, "source": "dataset replies"}


def test_records_of_a_run_started_before_records_had_a_version_read_as_version_1(conn):
    meta = RunMeta(conn)
    meta.set("target", UNVERSIONED_TARGET)
    meta.set("vocab", UNVERSIONED_VOCAB)
    target, vocab = read_target(meta), read_vocab(meta)
    assert target.version == vocab.version == 1
    assert target.model == "/models/tiny" and target.aux_layers == (1, 2, 1) and target.max_length == 512
    assert vocab.target_ids() == [3, 50, 90] and vocab.source == "dataset replies" and vocab.coverage == 0.95652
    assert target.to_meta() == {**UNVERSIONED_TARGET, "version": 1}
    assert vocab.to_meta() == {**UNVERSIONED_VOCAB, "version": 1}


def test_each_record_round_trips_through_the_run(conn):
    meta = RunMeta(conn)
    assert read_target(meta) is None and read_vocab(meta) is None  # the rollout has not prepared the run yet
    target = TargetRecord(model="/m", hidden_size=8, vocab_size=10, num_hidden_layers=7, aux_layers=[2, 3, 4],
                          dtype="bfloat16", max_length=96)
    write_target(meta, target)
    first = VocabRecord.from_target_ids([9, 1, 4], source="dataset replies")
    assert write_vocab_once(meta, first) == first
    assert write_vocab_once(meta, VocabRecord.from_target_ids([0, 1, 2])) == first  # the first writer wins
    assert read_target(meta) == target and read_vocab(meta) == first and first.d2t == (1, 3, 7)


@pytest.mark.parametrize("value, says", [
    ({**UNVERSIONED_TARGET, "version": 2}, "record version 2, but this dataflow reads version 1"),
    ({k: v for k, v in UNVERSIONED_TARGET.items() if k != "hidden_size"}, "the record lacks hidden_size"),
    ("float32", "not a record"),
])
def test_a_target_record_of_another_version_or_missing_a_field_is_one_clear_line(value, says):
    with pytest.raises(InputError, match=says) as refused:
        TargetRecord.from_meta(value)
    assert "\n" not in str(refused.value) and "--db" in str(refused.value)


@pytest.mark.parametrize("value, says", [
    ({**UNVERSIONED_VOCAB, "version": 7}, "record version 7"),
    ({"draft_vocab_size": 3}, "the record lacks d2t"),
    ({**UNVERSIONED_VOCAB, "draft_vocab_size": 4}, "d2t must be a list of draft_vocab_size ints"),
    ({**UNVERSIONED_VOCAB, "d2t": [3, 49, "x"]}, "d2t must be a non-empty list of ints"),
])
def test_a_vocab_record_of_another_version_missing_a_field_or_malformed_is_one_clear_line(value, says):
    with pytest.raises(InputError, match=says) as refused:
        VocabRecord.from_meta(value)
    assert "\n" not in str(refused.value)


def test_the_trainer_builds_its_draft_from_the_records_of_an_unversioned_run(conn, tiny_train_target):
    meta = RunMeta(conn)
    meta.set("target", {k: v for k, v in target_record(tiny_train_target).to_meta().items() if k != "version"})
    meta.set("vocab", {"draft_vocab_size": 3, "d2t": [3, 49, 88], "counted_tokens": 23})
    target, vocab = wait_for_records(meta, on_wait=lambda *_: None)
    model, _ = build_draft(target, vocab, TrainConfig())
    assert model.d2t.tolist() == [3, 49, 88] and model.t2d.nonzero().flatten().tolist() == [3, 50, 90]
