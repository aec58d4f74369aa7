from collections import Counter

import pytest

from dataflow.rollout.template import TokenizedSample
from dataflow.rollout.vocab import count_tokens, draft_vocab, target_ids_of


def test_only_loss_masked_tokens_are_counted():
    sample = TokenizedSample("a", [5, 6, 7, 7], [False, True, True, True])
    assert count_tokens([sample, None]) == Counter({7: 2, 6: 1})


def test_prompt_only_data_falls_back_to_counting_every_token():
    assert count_tokens([TokenizedSample("a", [1, 2, 2], [False] * 3)]) == Counter({2: 2, 1: 1})


def test_draft_vocab_keeps_the_most_frequent_tokens_sorted_by_target_id():
    vocab = draft_vocab(Counter({90: 10, 3: 5, 50: 7, 7: 1}), vocab_size=100, draft_vocab_size=3)
    assert target_ids_of(vocab) == [3, 50, 90]
    assert vocab == {"draft_vocab_size": 3, "d2t": [3, 49, 88]}


def test_a_draft_vocab_larger_than_the_seen_tokens_is_topped_up_with_the_lowest_unseen_ids():
    vocab = draft_vocab(Counter({9: 3}), vocab_size=10, draft_vocab_size=4)
    assert target_ids_of(vocab) == [0, 1, 2, 9]


def test_a_draft_vocab_larger_than_the_target_vocab_is_refused():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        draft_vocab(Counter(), vocab_size=10, draft_vocab_size=11)
