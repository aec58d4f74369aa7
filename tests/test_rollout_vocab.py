from collections import Counter

import pytest

from dataflow.rollout.template import TokenizedSample
from dataflow.rollout.vocab import count_tokens, covered, draft_vocab


def test_only_loss_masked_tokens_are_counted():
    sample = TokenizedSample("a", [5, 6, 7, 7], [False, True, True, True])
    assert count_tokens([sample, None]) == Counter({7: 2, 6: 1})


def test_prompt_only_data_falls_back_to_counting_every_token():
    assert count_tokens([TokenizedSample("a", [1, 2, 2], [False] * 3)]) == Counter({2: 2, 1: 1})


def test_draft_vocab_keeps_the_most_frequent_tokens_sorted_by_target_id():
    vocab = draft_vocab(Counter({90: 10, 3: 5, 50: 7, 7: 1}), vocab_size=100, draft_vocab_size=3)
    assert vocab.target_ids() == [3, 50, 90]
    assert vocab.d2t == (3, 49, 88) and vocab.draft_vocab_size == 3
    assert vocab.coverage == pytest.approx(22 / 23, abs=1e-5) and vocab.counted_tokens == 23
    assert vocab.distinct_counted == 4


def test_slots_the_replies_leave_free_go_to_tokens_seen_elsewhere_before_the_lowest_unseen_ids():
    replies, seen = Counter({9: 3}), Counter({40: 5, 20: 1, 9: 1})
    vocab = draft_vocab(replies, vocab_size=50, draft_vocab_size=4, fallbacks=(seen,))
    assert vocab.target_ids() == [0, 9, 20, 40]
    assert vocab.coverage == 1.0


def test_fallbacks_rank_in_turn():
    first, second = Counter({7: 0.5}), Counter({8: 9, 7: 1})
    vocab = draft_vocab(Counter({1: 2}), vocab_size=10, draft_vocab_size=2, fallbacks=(first, second))
    assert vocab.target_ids() == [1, 7]
    vocab = draft_vocab(Counter({1: 2}), vocab_size=10, draft_vocab_size=3, fallbacks=(first, second))
    assert vocab.target_ids() == [1, 7, 8]


def test_a_reply_token_always_outranks_a_more_frequent_token_seen_only_elsewhere():
    vocab = draft_vocab(Counter({3: 1}), vocab_size=10, draft_vocab_size=1, fallbacks=(Counter({5: 100}),))
    assert vocab.target_ids() == [3]


def test_a_draft_vocab_larger_than_the_target_vocab_is_refused():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        draft_vocab(Counter(), vocab_size=10, draft_vocab_size=11)


def test_coverage_of_a_sample_counts_its_trained_tokens_inside_the_vocab():
    assert covered([1, 2, 3, 4], [False, True, True, True], frozenset({2, 4, 1})) == (2, 3)
