"""Speculative decoding: exact outputs, the draft's chain equals its training-time unroll, and τ counts."""

import pytest
import torch

from dataflow.eval import speculative as spec
from dataflow.eval.speculative import SpecStats, Target, greedy, propose, speculative
from dataflow.train.eagle3 import DraftConfig, Eagle3Draft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # confident, so greedy does not wander into ties
    draft_cfg = DraftConfig.from_target(config.to_dict(), draft_vocab_size=200)
    d2t = torch.arange(200) * 0 + 50  # draft id i is target id i + 50
    t2d = torch.zeros(300, dtype=torch.bool)
    t2d[50:250] = True
    torch.manual_seed(1)
    draft = Eagle3Draft(draft_cfg, embed_tokens=model.model.embed_tokens.weight.detach(), d2t=d2t, t2d=t2d).eval()
    return Target(model, [2, 2, 1]), draft


def test_draft_chain_at_inference_equals_the_training_time_unroll(tiny):
    target, draft = tiny
    T, k = 12, 4
    seq = torch.randint(0, 300, (1, T + 1))  # T positions with features, plus the target's next token
    aux = torch.randn(1, T, 3 * 64)
    guesses = propose(draft, seq, aux, k)
    # The TTT forward at position T-1 reads tokens T, T+1, ...: feed it the guesses the chain made.
    ids = torch.cat([seq, torch.tensor([guesses[:-1]])], dim=1)  # (1, T + k)
    padded_aux = torch.cat([aux, torch.zeros(1, k, 3 * 64)], dim=1)
    with torch.no_grad():
        logits = draft(ids, padded_aux, ttt_length=k)
    unrolled = [logits[s][0, T - 1].argmax().item() + 50 for s in range(k)]
    assert unrolled == guesses


def test_speculative_output_equals_greedy_even_with_a_random_draft(tiny):
    target, draft = tiny
    stats = SpecStats()
    for seed in range(3):
        prompt = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        reference, _ = greedy(target, prompt, 24, eos=set())
        assert speculative(target, draft, prompt, 24, set(), 5, stats) == reference
    assert stats.steps > 0 and 1.0 <= stats.tau <= 6.0


def test_a_draft_that_guesses_the_target_exactly_reaches_tau_k_plus_one(tiny, monkeypatch):
    target, draft = tiny
    prompt = list(range(10, 18))
    reference, _ = greedy(target, prompt, 40, eos=set())

    def oracle(draft, tokens, aux, k):
        done = tokens.shape[1] - len(prompt)  # tokens = prompt + generated so far (incl. the newest)
        return reference[done : done + k]

    monkeypatch.setattr(spec, "propose", oracle)
    stats = SpecStats()
    assert speculative(target, draft, prompt, 36, set(), 5, stats) == reference[:36]
    assert stats.per_position() == [1.0] * 5
    assert stats.tau == 6.0
