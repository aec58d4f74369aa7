"""The producer loop in-process on a tiny Llama: features through the store, regeneration, vocab, config."""

import pytest
import torch

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue, TaskState
from dataflow.errors import ConfigMismatch
from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.data import load_dataset
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig
from dataflow.rollout.producer import run_rollout
from dataflow.rollout.template import tokenize_sample
from dataflow.testing import build_tiny_target
from dataflow.rollout.ui import RolloutView
from dataflow.rollout.vocab import target_ids_of
from dataflow.transport import open_reader


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return HFEngine(HFEngineConfig(model_dir=build_tiny_target(tmp_path_factory.mktemp("tiny") / "t"), threads=1))


def rollout(tmp_path, engine, **options):
    conn = connect(tmp_path / "run.sqlite")
    config = RolloutConfig(store="files", store_dir=tmp_path / "features", **{"num_samples": 12, **options})
    stats = run_rollout(conn, config, engine, RolloutView(enabled=False))
    return conn, config, stats


def test_features_read_back_through_the_store_equal_the_forward(tmp_path, engine):
    conn, config, stats = rollout(tmp_path, engine, token_budget=512)
    samples = {s.id: s for s in load_dataset().samples[:12]}
    leases = RefQueue(conn).lease("test", n=100)
    assert sorted(lease.key for lease in leases) == sorted(samples) and stats.samples == 12
    reader = open_reader(conn)
    for lease in leases:
        features = reader.open(lease.handle)
        tokenized = tokenize_sample(engine.tokenizer, samples[lease.key], max_length=config.max_length)
        [expected] = engine.features([tokenized])
        assert set(features) == {"input_ids", "loss_mask", "aux_hidden", "target_hidden"}
        assert torch.equal(features["input_ids"], expected["input_ids"])
        assert torch.equal(features["loss_mask"], expected["loss_mask"])
        # batched (padded) vs alone: same values up to float reduction order
        torch.testing.assert_close(features["aux_hidden"], expected["aux_hidden"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(features["target_hidden"], expected["target_hidden"], atol=1e-4, rtol=1e-4)
        reader.release(lease.handle)
    reader.close()


def test_the_run_records_target_vocab_and_end_of_stream(tmp_path, engine):
    conn, config, _ = rollout(tmp_path, engine, draft_vocab_size=500)
    meta = RunMeta(conn)
    target = meta.get("target")
    assert target["model"] == str(engine.config.model_dir.resolve()) and target["max_length"] == config.max_length
    assert target["aux_layers"] == [2, 2, 1] and target["hidden_size"] == 64 and target["dtype"] == "float32"
    vocab = meta.get("vocab")
    ids = target_ids_of(vocab)
    assert vocab["draft_vocab_size"] == 500 and ids == sorted(set(ids)) and max(ids) < target["vocab_size"]
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ids  # every reply ends with it: the most frequent masked token
    assert meta.end_of_stream() and TaskQueue(conn).counts()["done"] == 12


def test_epochs_produce_one_ref_per_sample_and_epoch_with_epoch_suffixed_keys(tmp_path, engine):
    conn, _, stats = rollout(tmp_path, engine, num_samples=3, epochs=2)
    keys = sorted(lease.key for lease in RefQueue(conn).lease("test", n=100))
    ids = [s.id for s in load_dataset().samples[:3]]
    assert keys == sorted(ids + [f"{i}#e1" for i in ids]) and stats.samples == 6


def test_a_restart_with_a_different_max_length_is_a_config_mismatch(tmp_path, engine):
    rollout(tmp_path, engine, num_samples=2)
    with pytest.raises(ConfigMismatch, match="max_length"):
        rollout(tmp_path, engine, num_samples=2, max_length=100)


def test_regenerated_replies_are_kept_in_the_task_payload(tmp_path, engine):
    conn, _, stats = rollout(tmp_path, engine, num_samples=2, regenerate=True, max_new_tokens=3)
    assert stats.regenerated == 2
    payloads = [r["payload"] for r in conn.execute("SELECT payload FROM tasks")]
    assert all('"regenerated": true' in p for p in payloads)


def test_samples_without_assistant_tokens_are_skipped_and_counted(tmp_path, engine):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(
        '{"id": "a", "conversations": [{"role": "user", "content": "only a prompt"}]}\n'
        '{"id": "b", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
    )
    conn, _, stats = rollout(tmp_path, engine, dataset=dataset)
    assert stats.skipped_no_assistant == 1 and stats.samples == 1
    assert [lease.key for lease in RefQueue(conn).lease("test", n=10)] == ["b"]


def test_a_restarted_rollout_takes_over_the_id_of_a_dead_one_but_not_of_a_running_one(tmp_path):
    import subprocess
    import sys

    from dataflow.rollout.producer import choose_producer_id

    meta = RunMeta(connect(tmp_path / "run.sqlite"))
    meta.heartbeat("rollout-r0", "rollout", "producing")  # this test process: running
    assert choose_producer_id(meta) == "r1"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    meta.conn.execute("UPDATE processes SET pid = ? WHERE id = 'rollout-r0'", (int(child.stdout),))  # now dead
    assert choose_producer_id(meta) == "r0"


def test_a_conversation_the_chat_template_refuses_becomes_a_dead_task_and_the_rest_is_produced(tmp_path, engine):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(
        '{"id": "twice", "conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},'
        ' {"role": "assistant", "content": "c"}]}\n'
        '{"id": "ok", "conversations": [{"role": "user", "content": "Hi"},'
        ' {"role": "assistant", "content": "Hello"}]}\n'
    )
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    strict_engine = HFEngine(HFEngineConfig(model_dir=engine.config.model_dir, threads=1, chat_template=strict))
    conn, _, stats = rollout(tmp_path, strict_engine, dataset=dataset)
    assert stats.failed == 1 and stats.samples == 1
    row = conn.execute("SELECT state, last_error FROM tasks WHERE key = 'twice'").fetchone()
    assert row["state"] == TaskState.DEAD and "roles must alternate" in row["last_error"]
    assert RunMeta(conn).end_of_stream()


def test_heartbeat_and_leases_stay_fresh_during_a_long_forward(tmp_path):
    import time

    from dataflow.rollout.producer import beating_during

    db = tmp_path / "run.sqlite"
    conn = connect(db)
    meta, tasks = RunMeta(conn), TaskQueue(conn)
    tasks.add_many([("k", {})])
    [lease] = tasks.lease("me", ttl=4.0)
    first_deadline = conn.execute("SELECT lease_deadline FROM tasks").fetchone()[0]
    with beating_during(str(db), "rollout-x", "producing", {"samples": 3}, [lease.token], ttl=4.0):
        # the main thread is busy (stands for a forward); the beat and the extension come from the side thread
        while conn.execute("SELECT lease_deadline FROM tasks").fetchone()[0] == first_deadline:
            time.sleep(0.1)
    [process] = meta.processes("rollout")
    assert process.id == "rollout-x" and process.status == "producing" and process.info == {"samples": 3}
    assert tasks.complete(lease.token)  # still ours


def test_the_summary_gives_no_share_of_forward_time_when_no_forward_ran():
    from dataflow.rollout.producer import RolloutStats

    idle = RolloutStats(sqlite_s=0.6)
    assert "% of forward" not in idle.summary() and "overhead 0.60s (tokenise" in idle.summary()
    busy = RolloutStats(forward_s=2.0, sqlite_s=0.5)
    assert "25.0% of forward" in busy.summary()
