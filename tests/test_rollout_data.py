import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataflow.errors import InputError
from dataflow.rollout.data import default_dataset_path, load_dataset, split_held_out, spread


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_sharegpt_rows_are_normalised_to_roles_and_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "s1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "s2", "conversations": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Q"}]},
    ])
    samples = load_dataset(path).samples
    assert samples[0].messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})
    assert [m["role"] for m in samples[1].messages] == ["system", "user"]


def test_text_rows_are_kept_as_preformatted_text_and_rows_without_id_get_their_line_number(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain text"}])
    [sample] = load_dataset(path).samples
    assert sample.text == "plain text" and sample.id == "line1" and sample.messages == ()


def test_bad_rows_fail_with_file_line_and_a_count_of_what_would_be_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "ok", "conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        "{not json",
        {"id": "r", "conversations": [{"role": "robot", "content": "beep"}]},
        {"id": "e", "conversations": []},
    ])
    with pytest.raises(InputError) as err:
        load_dataset(path)
    message = str(err.value)
    assert f"{path}:2: invalid JSON" in message and "3 bad rows" in message and "--on-bad-row skip" in message


def test_bad_rows_are_skipped_and_reported_on_request(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        "{not json",
        {"id": "r", "conversations": [{"role": "robot", "content": "beep"}]},
        {"id": "ok", "conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"id": "ok", "text": "duplicate id"},
    ])
    loaded = load_dataset(path, on_bad_row="skip")
    assert [s.id for s in loaded.samples] == ["ok"]
    assert [p.split(": ")[0] for p in loaded.skipped] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert "unknown role 'robot'" in loaded.skipped[1]


def test_a_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")


def test_the_bundled_dataset_has_hundreds_of_varied_real_conversations():
    samples = load_dataset(default_dataset_path()).samples
    assert len(samples) >= 200
    prompts = [s.messages[0]["content"] if s.messages[0]["role"] != "system" else s.messages[1]["content"]
               for s in samples]
    assert len(set(prompts)) == len(prompts)
    assert all(any(m["role"] == "assistant" and m["content"].strip() for m in s.messages) for s in samples)
    categories = {s.id.split("-")[0] for s in samples}
    assert {"qa", "code", "math", "writing", "chat"} <= categories


def test_held_out_rows_are_spread_through_the_file_and_text_rows_are_never_held_out(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "conversations": [{"role": "user", "content": "A"}]},
        {"id": "b", "conversations": [{"role": "user", "content": "B"}]},
        {"id": "t", "text": "pre-formatted"},
        {"id": "c", "conversations": [{"role": "user", "content": "C"}]},
    ])
    samples = load_dataset(path).samples
    train, held_out = split_held_out(samples, 2)
    assert [s.id for s in train] == ["b", "t"] and [s.id for s in held_out] == ["a", "c"]
    assert split_held_out(samples, 1)[1] == [samples[1]]  # the middle conversation
    assert split_held_out(samples, 0) == (samples, [])
    with pytest.raises(InputError, match="--held-out 3: .* only 3 conversation rows"):
        split_held_out(samples, 3)


def test_the_bundled_datasets_held_out_rows_cover_every_topic_in_proportion():
    """The bundled file is grouped by topic: its last 16 rows are all multi-turn chat."""
    samples = load_dataset(default_dataset_path()).samples
    topic = lambda s: s.id.rsplit("-", 1)[0]
    train, held_out = split_held_out(samples, 16)
    assert {topic(s) for s in held_out} == {topic(s) for s in samples}
    for name in {topic(s) for s in samples}:
        share = sum(topic(s) == name for s in samples) / len(samples)
        assert abs(sum(topic(s) == name for s in held_out) - 16 * share) <= 1, name
    assert len(train) + len(held_out) == len(samples) and not {s.id for s in train} & {s.id for s in held_out}


@given(st.integers(1, 500), st.integers(0, 500))
def test_spread_picks_distinct_items_in_order(n_items, n):
    picked = spread(list(range(n_items)), n)
    assert len(picked) == min(n, n_items) and picked == sorted(set(picked))
    if 0 < n <= n_items:  # evenly: gaps differ by at most one
        gaps = [b - a for a, b in zip(picked, picked[1:])]
        assert not gaps or max(gaps) - min(gaps) <= 1


def test_ids_with_the_reserved_key_separators_are_bad_rows(tmp_path):
    rows = [{"id": "x@1", "text": "t"}, {"id": "y#e1", "text": "t"}, {"id": "ok", "text": "t"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert len(load_dataset(path, on_bad_row="skip").skipped) == 2
