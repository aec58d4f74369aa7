"""The draft model, its loss and its export, against hand-made tensors and naive re-computations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from dataflow.errors import InputError
from dataflow.records import VocabRecord
from dataflow.train.checkpoint import draft_from_export, write_export
from dataflow.train.eagle3 import DraftConfig, Eagle3Draft, apply_rotary, rotary_tables
from dataflow.train.loss import STEP_DECAY, TeacherHead, draft_target_ids, loss_tokens, teacher, teacher_head, ttt_sums
from dataflow.train.target import load_target_head
from dataflow.train.testing import build_tiny_target
from dataflow.train.vocab import vocab_from_record, vocab_from_target_ids

V, VD, H = 50, 20, 16


def tiny_draft(seed=0, draft_vocab=VD, heads=4, kv_heads=2) -> Eagle3Draft:
    torch.manual_seed(seed)
    cfg = DraftConfig(hidden_size=H, intermediate_size=24, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=H // heads, vocab_size=V, draft_vocab_size=draft_vocab, target_hidden_size=H)
    vocab = vocab_from_target_ids(torch.randperm(V)[:draft_vocab], V)
    model = Eagle3Draft(cfg, embed_tokens=torch.randn(V, H), d2t=vocab.d2t, t2d=vocab.t2d)
    for p in model.parameters():  # norms start at 1; randomise so a swapped norm would show
        p.data.normal_(0, 0.3) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    return model


def head_of(model: Eagle3Draft, lm_head: torch.Tensor, dtype=torch.float32) -> TeacherHead:
    return teacher_head(lm_head, draft_target_ids(model.d2t), dtype)


# The DESIGN "Checkpoint" list, written out by hand: a wrong name would load silently as random weights.
def design_export(heads=4, kv_heads=2, hd=H // 4, inter=24):
    return {
        "midlayer.self_attn.q_proj.weight": ([heads * hd, 2 * H], torch.float32),
        "midlayer.self_attn.k_proj.weight": ([kv_heads * hd, 2 * H], torch.float32),
        "midlayer.self_attn.v_proj.weight": ([kv_heads * hd, 2 * H], torch.float32),
        "midlayer.self_attn.o_proj.weight": ([H, heads * hd], torch.float32),
        "midlayer.mlp.gate_proj.weight": ([inter, H], torch.float32),
        "midlayer.mlp.up_proj.weight": ([inter, H], torch.float32),
        "midlayer.mlp.down_proj.weight": ([H, inter], torch.float32),
        "midlayer.input_layernorm.weight": ([H], torch.float32),
        "midlayer.hidden_norm.weight": ([H], torch.float32),
        "midlayer.post_attention_layernorm.weight": ([H], torch.float32),
        "fc.weight": ([H, 3 * H], torch.float32),
        "norm.weight": ([H], torch.float32),
        "lm_head.weight": ([VD, H], torch.float32),
        "d2t": ([VD], torch.int64),
        "t2d": ([V], torch.bool),
    }


def test_export_has_exactly_the_design_names_shapes_and_dtypes(tmp_path):
    model = tiny_draft()
    write_export(model, tmp_path, dtype=torch.float32, include_embed=False, aux_layers=[2, 3, 4])
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        got = {name: (list(f.get_tensor(name).shape), f.get_tensor(name).dtype) for name in f.keys()}
    assert got == design_export()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert (config["vocab_size"], config["draft_vocab_size"], config["hidden_size"]) == (V, VD, H)
    # The layers it was trained on, as each server reads them: vLLM's top-level HF hidden_states indices,
    # SGLang's eagle_config one less (it captures the input of layer id + 1).
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 3, 4]
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}


def test_every_parameter_of_the_draft_is_in_the_export(tmp_path):
    model = tiny_draft()
    write_export(model, tmp_path, dtype=torch.bfloat16, include_embed=True, aux_layers=[2, 3, 4])
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16 and f.get_tensor("d2t").dtype == torch.int64
    assert {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()} == names


def test_export_then_reload_gives_identical_logits(tmp_path):
    model = tiny_draft()
    write_export(model, tmp_path, dtype=torch.float32, include_embed=False, aux_layers=[2, 3, 4])
    reloaded = draft_from_export(tmp_path, embed_tokens=model.embed_tokens.weight.data)
    ids, aux = torch.randint(0, V, (2, 9)), torch.randn(2, 9, 3 * H)
    for a, b in zip(model(ids, aux, 3), reloaded(ids, aux, 3)):
        assert torch.equal(a, b)
    assert torch.equal(reloaded.d2t, model.d2t) and torch.equal(reloaded.t2d, model.t2d)


def naive_ttt_logits(model: Eagle3Draft, ids: torch.Tensor, aux: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """One sequence (T,), position by position: step k at t sees step-0 keys <= t and its own chain at t."""
    cfg, layer = model.cfg, model.midlayer
    T, nh, nkv, hd = ids.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cos, sin = rotary_tables(cfg, torch.arange(T + steps))
    hidden = model.fc(aux)  # (T, H)
    keys, values, out = [], [], []
    for k in range(steps):
        tokens = torch.tensor([int(ids[t + k + 1]) if t + k + 1 < T else 0 for t in range(T)])
        x = torch.cat([layer.input_layernorm(model.embed_tokens(tokens)), layer.hidden_norm(hidden)], -1)
        rot = lambda y, n: apply_rotary(y.view(T, n, hd).transpose(0, 1), cos[k:k + T], sin[k:k + T])
        q, kk = rot(layer.self_attn.q_proj(x), nh), rot(layer.self_attn.k_proj(x), nkv)
        keys.append(kk), values.append(layer.self_attn.v_proj(x).view(T, nkv, hd).transpose(0, 1))
        attn = torch.zeros(nh, T, hd)
        for h in range(nh):
            g = h // (nh // nkv)
            for t in range(T):
                ks = [keys[0][g, s] for s in range(t + 1)] + [keys[j][g, t] for j in range(1, k + 1)]
                vs = [values[0][g, s] for s in range(t + 1)] + [values[j][g, t] for j in range(1, k + 1)]
                w = torch.softmax(torch.stack([q[h, t] @ key for key in ks]) / math.sqrt(hd), 0)
                attn[h, t] = sum(wi * vi for wi, vi in zip(w, vs))
        residual = hidden + layer.self_attn.o_proj(attn.transpose(0, 1).reshape(T, nh * hd))
        hidden = residual + layer.mlp(layer.post_attention_layernorm(residual))
        out.append(model.logits(hidden))
    return out


def test_ttt_forward_equals_a_position_by_position_recomputation():
    model = tiny_draft()
    ids, aux = torch.randint(0, V, (2, 7)), torch.randn(2, 7, 3 * H)
    with torch.no_grad():
        batched = model(ids, aux, 4)
        for b in range(2):
            for k, naive in enumerate(naive_ttt_logits(model, ids[b], aux[b], 4)):
                torch.testing.assert_close(batched[k][b], naive, atol=1e-5, rtol=1e-5)


def test_loss_equals_a_direct_recomputation():
    model = tiny_draft()
    T, steps = 8, 3
    ids, aux, target_hidden = torch.randint(0, V, (1, T)), torch.randn(1, T, 3 * H), torch.randn(1, T, H)
    lm_head = torch.randn(V, H)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    logits = model(ids, aux, steps)
    normed = model.normed_states(ids, aux, steps)
    sums = ttt_sums(model, normed, teacher(target_hidden, head_of(model, lm_head), loss_mask))
    draft_ids = sorted(int(i) for i in torch.nonzero(model.t2d))  # target id of draft id d
    expected, n_tokens = 0.0, 0
    for i in range(T - 1):  # normaliser: teacher positions whose next token is an assistant token
        n_tokens += int(loss_mask[0, i + 1]) if i >= 1 else 0
    for k in range(steps):
        step_loss, correct, count = 0.0, 0, 0
        for t in range(T - k - 1):
            i = t + k + 1  # the teacher position
            full = lm_head @ target_hidden[0, i]
            if not (i + 1 < T and loss_mask[0, i + 1] and int(full.argmax()) in draft_ids):
                continue
            p = torch.softmax(full[draft_ids], 0)
            step_loss += -(p * torch.log_softmax(logits[k][0, t], 0)).sum()
            correct += draft_ids[int(logits[k][0, t].argmax())] == int(full.argmax())
            count += 1
        torch.testing.assert_close(sums.loss_sum[k], torch.as_tensor(step_loss, dtype=torch.float32))
        assert (int(sums.correct[k]), int(sums.count[k])) == (correct, count)
        expected += STEP_DECAY**k * step_loss
    torch.testing.assert_close(sums.weighted_loss(), torch.as_tensor(expected, dtype=torch.float32))
    assert int(loss_tokens(loss_mask)) == n_tokens == 5


def test_right_padding_does_not_change_a_samples_loss():
    model = tiny_draft()
    T = 9
    ids, aux, th = torch.randint(0, V, (1, T)), torch.randn(1, T, 3 * H), torch.randn(1, T, H)
    lm_head, mask = torch.randn(V, H), torch.ones(1, T, dtype=torch.bool)
    alone = ttt_sums(model, model.normed_states(ids, aux, 3), teacher(th, head_of(model, lm_head), mask))
    pad = lambda x: F.pad(x, (0, 0, 0, 4)) if x.dim() == 3 else F.pad(x, (0, 4))
    padded = ttt_sums(model, model.normed_states(pad(ids), pad(aux), 3),
                      teacher(pad(th), head_of(model, lm_head), pad(mask)))
    for a, b in zip(alone.loss_sum, padded.loss_sum):
        torch.testing.assert_close(a, b)
    assert [int(c) for c in alone.count] == [int(c) for c in padded.count]


def test_vocab_mapping_round_trips_through_the_run_record():
    vocab = vocab_from_target_ids([7, 3, 11], 12)
    assert vocab.d2t.tolist() == [3, 6, 9] and vocab.t2d.nonzero().flatten().tolist() == [3, 7, 11]
    again = vocab_from_record(VocabRecord.from_meta(VocabRecord(d2t=vocab.d2t.tolist()).to_meta()), 12)
    assert torch.equal(again.d2t, vocab.d2t) and torch.equal(again.t2d, vocab.t2d)


def test_a_vocab_record_out_of_the_targets_range_is_refused():
    with pytest.raises(InputError, match="must lie in"):
        vocab_from_record(VocabRecord.from_meta({"draft_vocab_size": 2, "d2t": [0, 20]}), 12)
    with pytest.raises(InputError, match="target ids increase"):
        VocabRecord.from_meta({"draft_vocab_size": 2, "d2t": [5, -5]})


def test_target_head_is_read_from_safetensors_and_falls_back_to_tied_embeddings(tmp_path):
    untied = load_target_head(build_tiny_target(tmp_path / "untied", vocab_size=40, hidden_size=16, num_layers=4))
    assert untied.embed_tokens.shape == untied.lm_head.shape == (40, 16)
    assert not torch.equal(untied.embed_tokens, untied.lm_head)
    tied_dir = build_tiny_target(tmp_path / "tied", vocab_size=40, hidden_size=16, tie_word_embeddings=True)
    tied = load_target_head(tied_dir)
    assert torch.equal(tied.embed_tokens, tied.lm_head)


def test_draft_config_defaults_follow_the_target_and_accept_overrides():
    target = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 5e5}
    cfg = DraftConfig.from_target(target, draft_vocab_size=100, overrides={"intermediate_size": 256})
    assert (cfg.head_dim, cfg.intermediate_size, cfg.rope_theta, cfg.target_hidden_size) == (16, 256, 5e5, 64)
    with pytest.raises(ValueError, match="unknown keys"):
        DraftConfig.from_target(target, draft_vocab_size=100, overrides={"hiden_size": 1})


STACKED = [(".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")]
LAYER_PARAMS = ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight", "input_layernorm.weight", "hidden_norm.weight",
                "post_attention_layernorm.weight"]


def stacked(name: str) -> str:
    for shard, fused in STACKED:
        if shard in name:
            return name.replace(shard, fused)
    return name


def sglang_param_of(name: str, params: set[str]) -> str | None:
    """SGLang LlamaForCausalLMEagle3.load_weights: d2t/t2d are buffers; else fuse, then try a `model.` prefix."""
    if "d2t" in name or "t2d" in name:
        return name
    name = stacked(name)
    name = name if name in params else f"model.{name}"
    return name if name in params else None  # SGLang skips it silently: a random weight at serving time


def vllm_param_of(name: str, params: set[str]) -> str | None:
    """vLLM Eagle3LlamaForCausalLM.load_weights: d2t -> draft_id_to_target_id, midlayer -> layers.0, model. prefix."""
    if "t2d" in name:
        return name
    if "d2t" in name:
        return name.replace("d2t", "draft_id_to_target_id")
    name = name.replace("midlayer.", "layers.0.")
    name = stacked(name if "lm_head" in name else f"model.{name}")
    return name if name in params else None


@pytest.mark.parametrize("loader, params", [
    (sglang_param_of, {f"model.midlayer.{p}" for p in LAYER_PARAMS}
     | {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight"}),
    (vllm_param_of, {f"model.layers.0.{p}" for p in LAYER_PARAMS}
     | {"model.embed_tokens.weight", "model.fc.weight", "model.norm.weight", "lm_head.weight",
        "draft_id_to_target_id"}),
])
def test_every_exported_tensor_lands_in_a_serving_parameter_and_every_trained_one_is_filled(tmp_path, loader, params):
    write_export(tiny_draft(), tmp_path, dtype=torch.float32, include_embed=False, aux_layers=[2, 3, 4])
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        landed = {name: loader(name, params) for name in f.keys()}
    assert None not in landed.values(), landed
    assert params - set(landed.values()) == {"model.embed_tokens.weight"}  # shared from the target when absent


def reference_weighted_loss(model, ids, aux, target_hidden, lm_head, loss_mask, steps) -> tuple[torch.Tensor, list]:
    """The previous implementation, kept as the reference: full logits at every position, masked afterwards."""
    from dataflow.train.loss import predicts_assistant

    full = target_hidden.float() @ lm_head.T  # (B, T, V)
    top = full.argmax(-1)
    probs = full.index_select(-1, draft_target_ids(model.d2t)).softmax(-1)
    valid = predicts_assistant(loss_mask) & model.t2d[top]
    total, counts, T = 0.0, [], ids.shape[1]
    for k, logits in enumerate(model(ids, aux, steps)):
        logp = logits[:, : T - k - 1].float().log_softmax(-1)
        ce = -(probs[:, k + 1 :] * logp).sum(-1)
        total = total + STEP_DECAY**k * (ce * valid[:, k + 1 :]).sum()
        counts.append(int(valid[:, k + 1 :].sum()))
    return total, counts


def test_the_fused_loss_and_its_gradients_equal_the_full_logits_reference_in_fp32():
    model = tiny_draft()
    B, T, steps = 3, 12, 4
    ids, aux, th = torch.randint(0, V, (B, T)), torch.randn(B, T, 3 * H), torch.randn(B, T, H)
    lm_head, mask = torch.randn(V, H), torch.rand(B, T) > 0.3
    expected, counts = reference_weighted_loss(model, ids, aux, th, lm_head, mask, steps)
    expected.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sums = ttt_sums(model, model.normed_states(ids, aux, steps), teacher(th, head_of(model, lm_head), mask))
    got = sums.weighted_loss()
    got.backward()
    assert sum(counts) > 10 and sums.count == counts
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)
