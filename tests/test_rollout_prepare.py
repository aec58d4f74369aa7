"""Choosing the prompts and fixing the vocabulary, in-process on a tiny Llama with the SmolLM2 tokenizer."""

import json

import pytest

from dataflow.control.meta import RunMeta
from dataflow.keys import copy_id, epoch_key, prompt_of
from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.data import Conversation, load_dataset, split_held_out
from dataflow.rollout.regenerate import normalised, user_header
from dataflow.rollout.template import tokenize_sample
from dataflow.rollout.testing import rollout_in_process
from dataflow.records import read_vocab
from dataflow.ui import collect


def rollout(tmp_path, engine, **options):
    conn, _, stats = rollout_in_process(tmp_path, engine, **{"num_samples": 6, **options})
    return conn, stats


def task_samples(conn) -> dict[str, tuple[Conversation, dict]]:
    rows = conn.execute("SELECT key, payload FROM tasks").fetchall()
    return {r["key"]: (Conversation.from_payload(json.loads(r["payload"])), json.loads(r["payload"])) for r in rows}


def trained_tokens(engine, sample: Conversation) -> set[int]:
    tokenized = tokenize_sample(engine.tokenizer, sample, max_length=2048)
    return {t for t, m in zip(tokenized.input_ids, tokenized.loss_mask) if m}


def test_with_regenerate_the_vocabulary_is_counted_from_the_targets_own_replies(tmp_path, tiny_engine):
    conn, stats = rollout(tmp_path, tiny_engine, regenerate=True, max_new_tokens=6, vocab_warmup=6, draft_vocab_size=20)
    regenerated = [s for s, payload in task_samples(conn).values() if payload.get("regenerated")]
    assert len(regenerated) == 6 and stats.regenerated == 0  # the warm-up wrote them all; the producer reused them
    own = set().union(*(trained_tokens(tiny_engine, s) for s in regenerated))
    original = set().union(*(trained_tokens(tiny_engine, s) for s in load_dataset().samples[:6]))
    assert len(own) <= 20 and own - original  # the target's random replies are not the dataset's
    vocab = read_vocab(RunMeta(conn))
    assert own <= set(vocab.target_ids()) and vocab.source == "regenerated replies"
    assert vocab.coverage == 1.0 and stats.vocab_coverage == 1.0


def test_coverage_of_the_published_tokens_reaches_the_summary_and_status(tmp_path, tiny_engine):
    conn, stats = rollout(tmp_path, tiny_engine, draft_vocab_size=40)
    assert 0 < stats.vocab_coverage < 1  # 40 ids cannot hold every token of six dataset replies
    assert f"draft vocab covers {stats.vocab_coverage:.1%} of trained tokens" in stats.summary()
    assert collect(conn)["vocab_coverage"] == pytest.approx(stats.vocab_coverage, abs=1e-5)


def test_no_training_task_prompts_with_a_held_out_row(tmp_path, tiny_engine):
    dataset = tmp_path / "d.jsonl"
    rows = [{"id": f"r{i}", "conversations": [{"role": "user", "content": f"question {i % 3}"},
                                               {"role": "assistant", "content": "an answer"}]} for i in range(8)]
    dataset.write_text("\n".join(map(json.dumps, rows)) + "\n")
    conn, _ = rollout(tmp_path, tiny_engine, dataset=dataset, num_samples=None, held_out=2)
    _, held_out = split_held_out(load_dataset(dataset).samples, 2)
    assert [s.id for s in held_out] == ["r2", "r6"]  # "question 2" and "question 0"
    # r0, r3 and r5 repeat the held-out prompts, r4 and r7 repeat r1: only r1 is trained on
    assert sorted(task_samples(conn)) == ["r1"]


def test_samples_per_prompt_gives_each_copy_its_own_task_and_sampled_reply(tmp_path, tiny_engine):
    conn, _ = rollout(tmp_path, tiny_engine, num_samples=3, regenerate=True, temperature=1.0, samples_per_prompt=2,
                      max_new_tokens=8, vocab_warmup=2)
    tasks = task_samples(conn)
    ids = [s.id for s in load_dataset().samples[:3]]
    assert sorted(tasks) == sorted(ids + [f"{i}@1" for i in ids])
    for i in ids:
        first, copy = tasks[i][0].messages, tasks[f"{i}@1"][0].messages
        assert first[0] == copy[0] and first[1] != copy[1]  # same prompt, another reply
    # every copy's ref key, in any epoch, names its prompt (what a held-out split by prompt groups on)
    assert {prompt_of(epoch_key(key, epoch)) for key in tasks for epoch in (0, 2)} == set(ids)
    assert prompt_of(epoch_key(copy_id("@self7", 1), 3)) == prompt_of("@self7") == "@self7"


def test_greedy_first_reply_writes_each_prompts_first_reply_greedily_and_samples_the_others(tmp_path, tiny_engine):
    # vocab_warmup 2 of 6 samples: replies are written both by the vocabulary warm-up and by the producer
    conn, _ = rollout(tmp_path, tiny_engine, num_samples=3, regenerate=True, temperature=1.0, samples_per_prompt=2,
                      greedy_first_reply=True, max_new_tokens=8, vocab_warmup=2)
    tasks = task_samples(conn)
    for sample in load_dataset().samples[:3]:
        first, copy = tasks[sample.id][0].messages, tasks[f"{sample.id}@1"][0].messages
        (greedy,) = tiny_engine.generate([list(first[:1])], max_new_tokens=8, temperature=0.0)
        assert first[1]["content"] == greedy and copy[1]["content"] != greedy


def test_self_written_prompts_start_from_the_bare_user_header_and_are_distinct(tmp_path, tiny_engine):
    header = user_header(tiny_engine.tokenizer)
    assert header.endswith("<|im_start|>user\n") and "assistant" not in header.split("<|im_start|>")[-1]
    conn, stats = rollout(tmp_path, tiny_engine, num_samples=2, regenerate=True, self_prompts=5, max_new_tokens=4,
                          vocab_warmup=3)
    own = {k: s for k, (s, _) in task_samples(conn).items() if k.startswith("@self")}
    assert sorted(own) == [f"@self{i}" for i in range(5)]
    prompts = [normalised(s.messages[0]["content"]) for s in own.values()]
    assert len(set(prompts)) == 5 and all(s.messages[-1]["role"] == "assistant" for s in own.values())
    _, held_out = split_held_out(load_dataset().samples, 16)
    assert not set(prompts) & {normalised(s.messages[0]["content"]) for s in held_out}
    assert stats.samples == 7


def test_a_restart_keeps_the_tasks_and_vocabulary_of_the_first_start(tmp_path, tiny_engine):
    conn, _ = rollout(tmp_path, tiny_engine, num_samples=2, regenerate=True, self_prompts=2, max_new_tokens=4)
    before = task_samples(conn), RunMeta(conn).get("vocab")
    conn, stats = rollout(tmp_path, tiny_engine, num_samples=2, regenerate=True, self_prompts=2, max_new_tokens=4)
    assert (task_samples(conn), RunMeta(conn).get("vocab")) == before and stats.samples == 0


@pytest.mark.parametrize("options, message", [
    ({"samples_per_prompt": 2, "regenerate": True}, "temperature > 0"),
    ({"self_prompts": 3}, "needs regenerate"),
    ({"greedy_first_reply": True, "regenerate": True, "temperature": 0.7}, "needs samples_per_prompt > 1"),
])
def test_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**options)
