"""Which prompts `dataflow eval` decodes: the dataset's held-out rows, or with --run the prompts a run's trainer held
out (--validation-share). Never a prompt any training sample came from."""

import pytest

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.tasks import TaskQueue
from dataflow.errors import InputError
from dataflow.eval.report import EvalConfig, eval_prompts
from dataflow.eval.speculative import speculative
from dataflow.keys import copy_id
from dataflow.rollout.data import load_dataset, split_held_out
from dataflow.train.validation import held_out

SHARE = 0.3


def user_turns(tokenizer, prompts: list[list[int]], candidates: list[str]) -> list[str]:
    """Which candidate user turn each rendered prompt carries (exactly one each)."""
    found = []
    for ids in prompts:
        text = tokenizer.decode(ids)
        hits = [c for c in candidates if c in text]
        assert len(hits) == 1, (text, hits)
        found.append(hits[0])
    return found


def test_the_dataset_prompts_are_first_user_turns_of_held_out_rows_spread_among_them(tmp_path, tiny_engine):
    tokenizer = tiny_engine.tokenizer
    train_rows, held_rows = split_held_out(load_dataset().samples, 16)
    firsts = [next(m for m in s.messages if m["role"] == "user")["content"] for s in held_rows]
    got = user_turns(tokenizer, eval_prompts(tokenizer, EvalConfig(draft=tmp_path, num_prompts=4)), firsts)
    assert got == [firsts[2], firsts[6], firsts[10], firsts[14]]
    assert not set(got) & {m["content"] for s in train_rows for m in s.messages}
    assert all(ids[-3:] == tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
               for ids in eval_prompts(tokenizer, EvalConfig(draft=tmp_path, num_prompts=2)))


def test_with_a_run_the_prompts_are_those_its_trainer_held_out_once_each(tmp_path, tiny_engine):
    tokenizer = tiny_engine.tokenizer
    conn = connect(tmp_path / "run.sqlite")
    RunMeta(conn).record_or_check_config("train", {"validation_share": SHARE})
    prompts = {f"p{i}": f"question {i} of forty?" for i in range(40)} | {"@self3": "a prompt the target wrote?"}
    tasks = [(copy_id(p, c) if c else p, {"id": p, "messages": [{"role": "user", "content": text},
                                                                 {"role": "assistant", "content": f"reply {c}"}], "text": None})
             for p, text in prompts.items() for c in range(2)]
    TaskQueue(conn).add_many(tasks + [("t2", {"id": "t2", "messages": [], "text": "pre-formatted, no prompt"})])
    kept_out = [text for p, text in prompts.items() if held_out(p, SHARE)]
    assert held_out("t2", SHARE)  # a held-out text row: no prompt to decode, skipped
    assert 0 < len(kept_out) < len(prompts)
    config = EvalConfig(draft=tmp_path, run=tmp_path / "run.sqlite", num_prompts=100)  # more than held out: all
    got = user_turns(tokenizer, eval_prompts(tokenizer, config), list(prompts.values()))
    assert got == kept_out  # one per prompt (its copies share it), in the order the run added them

    RunMeta(conn).set("config.train", {"validation_share": 0.0001})  # a share no prompt here falls in
    with pytest.raises(InputError, match=r"none of its 83 samples falls in its trainer's --validation-share 0.0001"):
        eval_prompts(tokenizer, config)
    RunMeta(conn).set("config.train", {"validation_share": 0.0})
    with pytest.raises(InputError, match=r"held no prompts out .*\(drop --run\)"):
        eval_prompts(tokenizer, config)


def test_no_baseline_skips_the_untrained_draft_and_still_checks_exactness(tmp_path, tiny_target, monkeypatch):
    import json

    import torch

    from dataflow.eval import report
    from dataflow.eval.report import evaluate
    from dataflow.train.checkpoint import write_export
    from dataflow.train.eagle3 import DraftConfig, Eagle3Draft

    target = json.loads((tiny_target / "config.json").read_text())
    vocab, draft_vocab = target["vocab_size"], 512
    torch.manual_seed(0)
    draft = Eagle3Draft(DraftConfig.from_target(target, draft_vocab_size=draft_vocab),
                        embed_tokens=torch.randn(vocab, target["hidden_size"]), d2t=torch.zeros(draft_vocab, dtype=torch.long),
                        t2d=torch.arange(vocab) < draft_vocab)
    write_export(draft, tmp_path, dtype=torch.float32, include_embed=False, aux_layers=[2, 3, 4])
    common = dict(draft=tmp_path, target_model=str(tiny_target), num_prompts=2, num_draft_tokens=2, max_new_tokens=6,
                  threads=1)
    decoded = []  # the drafts each prompt was decoded with
    monkeypatch.setattr(report, "speculative", lambda target, d, *args: decoded.append(d) or speculative(target, d, *args))
    with_floor = evaluate(EvalConfig(**common))
    assert len(decoded) == 4 and len({id(d) for d in decoded}) == 2  # the trained and the untrained draft, per prompt
    decoded.clear()
    without = evaluate(EvalConfig(**common, baseline=False))
    assert len(decoded) == 2 and len({id(d) for d in decoded}) == 1
    assert "tau_untrained" in with_floor and "tau_untrained" not in without
    assert without["exact_match"] and with_floor["exact_match"]
    assert without["tau"] == with_floor["tau"] and without["verify_steps"] == with_floor["verify_steps"]
