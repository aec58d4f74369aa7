"""--draft-init target: the draft starts as the target's last layer over its top captured layer, checked against
the target as transformers loads it."""

import pytest
import torch

from dataflow.errors import InputError
from dataflow.train.build import build_draft
from dataflow.train.config import TrainConfig
from dataflow.train.testing import build_tiny_target, draft_vocab_for, target_record, tiny_features


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    target = build_tiny_target(tmp_path_factory.mktemp("target") / "tiny")
    samples = tiny_features(target, [32, 48])
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    vocab = draft_vocab_for(samples, hf.lm_head.weight.detach(), 160)
    return target_record(target), vocab, samples, hf


def test_the_target_init_copies_the_last_layer_and_head_and_passes_the_top_captured_layer_through(tiny):
    record, vocab, samples, hf = tiny
    model, _ = build_draft(record, vocab, TrainConfig(draft_init="target"))
    random_model, _ = build_draft(record, vocab, TrainConfig())
    H = model.cfg.hidden_size
    last, mid = hf.model.layers[-1], model.midlayer
    with torch.no_grad():
        aux = samples[0]["aux_hidden"]
        top = max(range(len(record.aux_layers)), key=record.aux_layers.__getitem__)
        assert torch.equal(model.fc(aux), aux[:, top * H : (top + 1) * H])  # hidden = the top captured layer
        for proj in ("q_proj", "k_proj", "v_proj"):
            ours = getattr(mid.self_attn, proj).weight
            assert torch.equal(ours[:, H:], getattr(last.self_attn, proj).weight)
            # the embedding half has no counterpart in the target: the seeded random init stays
            assert torch.equal(ours[:, :H], getattr(random_model.midlayer.self_attn, proj).weight[:, :H])
        assert torch.equal(mid.self_attn.o_proj.weight, last.self_attn.o_proj.weight)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(mid.mlp, proj).weight, getattr(last.mlp, proj).weight)
        assert torch.equal(mid.hidden_norm.weight, last.input_layernorm.weight)
        assert torch.equal(mid.post_attention_layernorm.weight, last.post_attention_layernorm.weight)
        # the draft's head is the target's own over the draft vocabulary
        x = torch.randn(5, H)
        draft_ids = torch.arange(model.cfg.draft_vocab_size) + model.d2t
        target_logits = hf.lm_head(hf.model.norm(x))[:, draft_ids]
        assert torch.allclose(model.logits(x), target_logits, atol=1e-5)
        assert not torch.allclose(random_model.logits(x), target_logits, atol=1e-2)


def test_a_draft_shape_the_target_layer_does_not_fit_is_refused_in_one_line(tiny):
    record, vocab, _, _ = tiny
    with pytest.raises(InputError) as e:
        build_draft(record, vocab, TrainConfig(draft_init="target", draft_overrides={"intermediate_size": 96}))
    message = str(e.value)
    assert "\n" not in message and "mlp.gate_proj" in message and "--draft-init random" in message
    build_draft(record, vocab, TrainConfig(draft_overrides={"intermediate_size": 96}))  # random init still fits


def test_an_unknown_draft_init_is_refused():
    with pytest.raises(ValueError, match="--draft-init 'layer'"):
        TrainConfig(draft_init="layer")
