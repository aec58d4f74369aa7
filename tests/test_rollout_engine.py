import pytest
import torch

from dataflow.errors import InputError
from dataflow.rollout.engines.hf import (
    CPU_ATTENTION, HFEngine, HFEngineConfig, InverseCDFSampler, default_aux_layers, token_budget_batches,
)
from dataflow.rollout.template import TokenizedSample
from dataflow.testing import build_tiny_target


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = build_tiny_target(tmp_path_factory.mktemp("tiny") / "target", num_layers=8)
    return HFEngine(HFEngineConfig(model_dir=model_dir, threads=1, dtype="float32"))


def sample(key, n, seed):
    ids = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return TokenizedSample(key, ids, [i % 2 == 0 for i in range(n)])


def test_default_aux_layers_are_the_sglang_vllm_eagle3_choice():
    assert default_aux_layers(30) == [2, 15, 27]
    assert default_aux_layers(32) == [2, 16, 29]


def test_features_match_a_direct_hf_forward_at_the_aux_layers_with_padding_removed(engine):
    batch = [sample("long", 23, 0), sample("short", 7, 1)]
    features = engine.features(batch)
    H = engine.hidden_size
    assert engine.aux_layers == [2, 4, 5]
    for s, f in zip(batch, features):
        T = len(s.input_ids)
        with torch.inference_mode():
            direct = engine.model(input_ids=torch.tensor([s.input_ids]), output_hidden_states=True)
        expected_aux = torch.cat([direct.hidden_states[a][0] for a in (2, 4, 5)], dim=-1)
        assert f["aux_hidden"].shape == (T, 3 * H) and f["target_hidden"].shape == (T, H)
        assert f["input_ids"].dtype == torch.int64 and f["input_ids"].tolist() == s.input_ids
        assert f["loss_mask"].dtype == torch.bool and f["loss_mask"].tolist() == s.loss_mask
        torch.testing.assert_close(f["aux_hidden"], expected_aux, atol=1e-4, rtol=1e-4)
        # last hidden state after the final norm (HF's hidden_states[-1])
        torch.testing.assert_close(f["target_hidden"], direct.hidden_states[-1][0], atol=1e-4, rtol=1e-4)


def test_the_target_record_describes_what_the_trainer_needs(engine):
    record = engine.describe()
    assert record["hidden_size"] == 64 and record["num_hidden_layers"] == 8
    assert record["vocab_size"] == len(engine.tokenizer) and record["dtype"] == "float32"
    assert (engine.config.model_dir / "config.json").exists()


def test_auto_dtype_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    import dataflow.rollout.engines.hf as hf

    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hf, "cpu_has_fast_bf16", lambda: fast)
        assert HFEngineConfig(model_dir=".").torch_dtype == expected
        assert HFEngineConfig(model_dir=".", device="cuda").torch_dtype == torch.bfloat16
        assert HFEngineConfig(model_dir=".", dtype="float32").torch_dtype == torch.float32


def test_bf16_features_travel_through_both_stores_as_bf16(tmp_path, engine):
    from dataflow.control.db import connect
    from dataflow.transport import open_reader, open_writer

    bf16 = HFEngine(HFEngineConfig(model_dir=engine.config.model_dir, threads=1, dtype="bfloat16"))
    [features] = bf16.features([sample("a", 9, 0)])
    [exact] = engine.features([sample("a", 9, 0)])
    assert features["aux_hidden"].dtype == features["target_hidden"].dtype == torch.bfloat16
    torch.testing.assert_close(features["target_hidden"].float(), exact["target_hidden"], atol=0.1, rtol=0.05)
    for store in ("files", "shm"):
        conn = connect(tmp_path / f"{store}.sqlite")
        shm = tmp_path / "shm"  # a private directory: nothing is left in /dev/shm
        shm.mkdir(exist_ok=True)
        writer = open_writer(conn, store, "r0", 1 << 20, tmp_path / "features", max_sample_bytes=1 << 16, shm_dir=shm)
        handle, _ = writer.write("a", features)
        reader = open_reader(conn, shm_dir=shm)
        read = reader.open(handle)
        assert all(torch.equal(read[name], features[name]) for name in features)
        assert read["aux_hidden"].dtype == torch.bfloat16
        reader.close()
        writer.close()


def test_contenders_count_the_top_candidates_of_every_written_position(engine):
    counts = torch.zeros(engine.vocab_size)
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nA longer question"]
    replies = engine.complete(texts, max_new_tokens=5, temperature=0.0, contenders=counts)
    # the random tiny target never writes its end-of-turn token within 5 steps: 2 rows x 5 positions x top 5
    assert len(replies) == 2 and counts.sum().item() == 50
    assert counts.max().item() <= 10  # a token is among one position's top 5 at most once


def test_the_sampler_draws_from_the_tempered_softmax_and_never_an_impossible_id():
    scores = torch.tensor([2.0, 1.0, 0.5, float("-inf"), -1.0, 0.0])
    rows = 40_000
    for temperature in (0.7, 1.5):
        torch.manual_seed(0)
        processed = InverseCDFSampler(temperature)(None, scores.expand(rows, -1).clone())
        assert (processed == 0).sum(dim=1).eq(1).all()  # one possible token per row, the rest -inf
        assert torch.isinf(processed).sum() == rows * (len(scores) - 1)
        drawn = processed.argmax(dim=1)
        frequency = torch.bincount(drawn, minlength=len(scores)) / rows
        assert frequency[3] == 0
        torch.testing.assert_close(frequency, torch.softmax(scores / temperature, dim=0), atol=0.01, rtol=0)
    torch.manual_seed(1)
    first = InverseCDFSampler(0.7)(None, scores.expand(64, -1).clone())
    torch.manual_seed(1)
    assert torch.equal(first, InverseCDFSampler(0.7)(None, scores.expand(64, -1).clone()))


def test_the_sampler_keeps_the_argmax_of_rows_at_temperature_zero_and_draws_the_others_as_before():
    scores = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    temperatures = torch.tensor([0.0 if row % 2 == 0 else 0.7 for row in range(64)])
    torch.manual_seed(2)
    mixed = InverseCDFSampler(temperatures)(None, scores.clone()).argmax(dim=1)
    torch.manual_seed(2)
    all_sampled = InverseCDFSampler(0.7)(None, scores.clone()).argmax(dim=1)
    assert torch.equal(mixed[0::2], scores[0::2].argmax(dim=1))  # greedy rows: the target's top-1
    assert torch.equal(mixed[1::2], all_sampled[1::2])  # sampled rows: the same draws as with no greedy row
    assert not torch.equal(all_sampled[0::2], scores[0::2].argmax(dim=1))  # so the greedy rows did change


def test_per_text_temperatures_write_greedy_replies_where_zero(engine):
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nA longer question"]
    greedy = engine.complete(texts, max_new_tokens=8, temperature=0.0)
    torch.manual_seed(3)
    sampled = engine.complete(texts, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(3)
    mixed = engine.complete(texts, max_new_tokens=8, temperature=[0.0, 1.0])
    assert mixed == [greedy[0], sampled[1]] and sampled[0] != greedy[0]
    with pytest.raises(ValueError, match="1 temperatures for 2 rows"):
        engine.complete(texts, max_new_tokens=8, temperature=[0.0])


def test_sampled_completions_repeat_under_a_seed(engine):
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>user\nA longer question"]
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(engine.complete(texts, max_new_tokens=8, temperature=1.0))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_the_cpu_attention_computes_what_transformers_sdpa_does_in_prefill_and_decode(engine):
    from transformers import AutoModelForCausalLM

    assert engine.model.config._attn_implementation == CPU_ATTENTION
    stock = AutoModelForCausalLM.from_pretrained(engine.config.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lengths = [11, 6, 9]  # left-padded like generate's rows: the mask is exercised in both phases
    prompt = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11 + 4, dtype=torch.long)
    for row, n in enumerate(lengths):
        prompt[row, 11 - n :] = torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(row))
        mask[row, 11 - n :] = 1
    with torch.inference_mode():
        runs = []
        for model in (engine.model, stock):
            out = model(input_ids=prompt, attention_mask=mask[:, :11], use_cache=True)
            logits, cache, step = [out.logits], out.past_key_values, prompt[:, -1:]
            for t in range(4):  # one query over the cache: the grouped matmul path
                step = (step * 7 + t) % 1000
                out = model(input_ids=step, attention_mask=mask[:, : 12 + t], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
            runs.append(logits)
    for ours, theirs in zip(*runs):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_aux_layers_out_of_range_are_refused(engine):
    with pytest.raises(InputError, match="--aux-layers"):
        HFEngine(HFEngineConfig(model_dir=engine.config.model_dir, aux_layers=(1, 2, 99)))


def test_batches_are_length_sorted_within_the_token_budget():
    samples = [TokenizedSample(str(n), [0] * n, [True] * n) for n in (5, 40, 12, 30, 100, 8, 7)]
    batches = token_budget_batches(samples, token_budget=64, max_padding=1.0)
    assert [[len(s.input_ids) for s in b] for b in batches] == [[100], [40], [30, 12], [8, 7, 5]]


def test_batches_bound_the_padding_of_each_sample():
    samples = [TokenizedSample(str(n), [0] * n, [True] * n) for n in (100, 90, 80, 70, 60)]
    batches = token_budget_batches(samples, token_budget=10_000, max_padding=0.25)
    assert [[len(s.input_ids) for s in b] for b in batches] == [[100, 90, 80], [70, 60]]


def test_generate_writes_a_reply_to_the_last_user_turn(engine):
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A longer question?"}]]
    replies = engine.generate(prompts, max_new_tokens=4, temperature=0.0)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_default_aux_layers_that_repeat_or_go_backwards_are_refused_and_named_ones_accepted(tmp_path):
    shallow = build_tiny_target(tmp_path / "shallow", num_layers=5)  # default 2, 2, 2
    with pytest.raises(InputError, match=r"the default aux layers \[2, 2, 2\]: they repeat or go backwards"):
        HFEngine(HFEngineConfig(model_dir=shallow, threads=1))
    with pytest.raises(InputError, match="--aux-layers 3,1,4: they repeat or go backwards"):
        HFEngine(HFEngineConfig(model_dir=shallow, threads=1, aux_layers=(3, 1, 4)))
    assert HFEngine(HFEngineConfig(model_dir=shallow, threads=1, aux_layers=(1, 2, 4))).aux_layers == [1, 2, 4]
