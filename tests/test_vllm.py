"""The vLLM engine: features equal to the HF engine's, regeneration, the one-line errors, and SmolLM2 end to end
(`rollout --engine vllm` -> `train` -> `eval --engine vllm`). vLLM starts in 20-40 s on 2 cores, so the tests
share one engine per target and the end-to-end test does the SmolLM2 comparison on the rollout's own output."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from dataflow.cli import app
from dataflow.rollout.engines import open_engine
from dataflow.rollout.engines.hf import HFEngine, HFEngineConfig
from dataflow.rollout.template import TokenizedSample, tokenize_sample
from dataflow.testing import build_tiny_target

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("CI"):  # CI installs the vllm extra (scripts/setup.sh): never skip there
    raise RuntimeError("vLLM is not installed in CI; scripts/setup.sh installs the vllm extra")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM not installed (pip install -e '.[vllm]')")
runner = CliRunner()


def assert_same_features(hf: dict, vllm: dict) -> float:
    """ids and masks equal, hidden states equal within fp32 rounding (relative to the largest |value|: these
    models have a few activations in the tens of thousands). Returns the max abs difference."""
    assert torch.equal(hf["input_ids"], vllm["input_ids"]) and torch.equal(hf["loss_mask"], vllm["loss_mask"])
    worst = 0.0
    for name in ("aux_hidden", "target_hidden"):
        assert hf[name].shape == vllm[name].shape and hf[name].dtype == vllm[name].dtype, name
        diff = (hf[name] - vllm[name]).abs().max().item()
        assert diff <= 2e-6 * hf[name].abs().max().item() + 1e-5, (name, diff)
        worst = max(worst, diff)
    return worst


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    """The tiny target in both engines: head_dim 32 (vLLM's CPU attention has no kernel for 16), a confident head
    (no near-ties in greedy decoding)."""
    config = HFEngineConfig(model_dir=build_tiny_target(tmp_path_factory.mktemp("tiny") / "t", hidden_size=128, head_scale=8.0), threads=1,
                            dtype="float32")  # fp32 in both: the comparison is within fp32 tolerance
    return HFEngine(config), open_engine("vllm", config, max_model_len=512)


@needs_vllm
@pytest.mark.slow
def test_vllm_features_equal_the_hf_engines_on_the_tiny_target(tiny_engines):
    hf, vllm = tiny_engines
    from dataflow.rollout.data import load_dataset

    samples = [tokenize_sample(hf.tokenizer, s, max_length=96) for s in load_dataset().samples[:4]]
    batch = [s for s in samples if s is not None]
    assert vllm.describe() == hf.describe()
    for a, b in zip(hf.features(batch), vllm.features(batch), strict=True):
        assert b["aux_hidden"].shape == (len(b["input_ids"]), 3 * hf.hidden_size)
        assert_same_features(a, b)


@needs_vllm
@pytest.mark.slow
def test_vllm_regeneration_is_batched_greedy_like_hf_and_samples_with_a_temperature(tiny_engines):
    hf, vllm = tiny_engines
    conversations = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "What is 2+2?"}]]
    greedy = vllm.generate(conversations, max_new_tokens=12, temperature=0.0)
    assert greedy == hf.generate(conversations, max_new_tokens=12, temperature=0.0) and all(greedy)
    torch.manual_seed(0)
    sampled = vllm.generate(conversations, max_new_tokens=12, temperature=1.5)
    assert all(sampled) and sampled != greedy
    for seed in (0, 1):  # --greedy-first-reply: a greedy row among sampled ones stays greedy
        torch.manual_seed(seed)
        mixed = vllm.generate(conversations, max_new_tokens=12, temperature=[0.0, 1.5])
        assert mixed[0] == greedy[0] and mixed[1] != greedy[1]


@needs_vllm
@pytest.mark.slow
def test_vllm_completes_bare_texts_and_counts_the_contenders_like_hf(tiny_engines):
    """Self-written prompts continue a bare chat header; the vocabulary warm-up counts the top candidates."""
    hf, vllm = tiny_engines
    texts = ["<|im_start|>user\n", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"]
    counts = [torch.zeros(hf.vocab_size), torch.zeros(vllm.vocab_size)]
    written = [engine.complete(texts, max_new_tokens=12, temperature=0.0, contenders=c)
               for engine, c in zip((hf, vllm), counts)]
    assert written[0] == written[1] and all(written[1])
    assert counts[1].sum() == counts[0].sum() > 0  # five candidates at every position written
    assert (counts[1] - counts[0]).abs().sum() <= 0.02 * counts[0].sum()  # the same ones, up to near-ties


def test_without_vllm_the_rollout_names_the_extra_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    target = build_tiny_target(tmp_path / "t")
    result = runner.invoke(app, ["rollout", "--db", str(tmp_path / "r.sqlite"), "--target-model", str(target),
                                 "--engine", "vllm", "--no-progress"])
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "vLLM is not installed" in lines[0] and "pip install -e '.[vllm]'" in lines[0]


def test_an_unknown_engine_is_one_line(tmp_path):
    result = runner.invoke(app, ["rollout", "--db", str(tmp_path / "r.sqlite"), "--engine", "tgi", "--no-progress"])
    assert result.exit_code == 2 and "error: --engine 'tgi': unknown engine; pass one of hf, vllm" in result.output


@needs_vllm
@pytest.mark.slow
def test_a_target_vllm_cannot_load_is_one_line_with_the_model_and_vllms_reason(tmp_path, tiny_engines):
    model = tmp_path / "odd"
    shutil.copytree(tiny_engines[0].config.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModelForCausalLM"]}))
    result = subprocess.run(
        [sys.executable, "-m", "dataflow", "rollout", "--db", str(tmp_path / "r.sqlite"), "--target-model", str(model),
         "--engine", "vllm", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and result.stdout == "", result.stdout
    [line] = result.stderr.splitlines()  # nothing of vLLM's own log
    assert line.startswith(f"error: target model {model}: vLLM cannot load it (") and "NoSuchModelForCausalLM" in line
    log = line.rpartition("its log: ")[2]
    assert "INFO" in open(log).read()  # vLLM's own start-up log went to the file, not to the terminal
    os.unlink(log)


def dataflow(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dataflow", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@needs_vllm
@pytest.mark.slow
def test_a_vllm_rollout_trains_a_draft_that_vllm_serves_exactly_on_smollm2(tmp_path):
    from dataflow.control.db import connect
    from dataflow.control.meta import RunMeta
    from dataflow.control.queue import RefQueue
    from dataflow.transport import open_reader

    db, store = tmp_path / "run.sqlite", tmp_path / "features"
    rollout = dataflow("rollout", "--db", str(db), "--engine", "vllm", "--num-samples", "4", "--max-length", "96",
                       "--regenerate", "--vocab-warmup", "2", "--max-new-tokens", "24",
                       "--dtype", "float32", "--store", "files", "--store-dir", str(store), "--threads", "1",
                       "--no-progress")
    assert rollout.stdout.startswith("rollout: 4 samples") and "INFO" not in rollout.stdout + rollout.stderr

    # The features vLLM captured equal the HF engine's on the same tokens.
    conn = connect(db)
    queue = RefQueue(conn)
    leases = queue.lease("test", n=4)
    hf = HFEngine(HFEngineConfig(model_dir=RunMeta(conn).get("target")["model"], threads=1, dtype="float32"))
    reader = open_reader(conn)
    for lease in leases:
        got = reader.open(lease.handle)
        sample = TokenizedSample(lease.key, got["input_ids"].tolist(), got["loss_mask"].tolist())
        assert_same_features(hf.features([sample])[0], got)
        queue.fail(lease.token, "read by the test", retryable=True)
    conn.close()

    dataflow("train", "--db", str(db), "--out", str(tmp_path / "train"), "--exit-when-idle", "1", "--threads", "1",
             "--no-progress")
    draft = tmp_path / "train" / "final"
    common = ["--draft", str(draft), "--num-prompts", "2", "--max-new-tokens", "16", "-k", "3", "--threads", "1", "--json"]
    served = json.loads(dataflow("eval", "--engine", "vllm", *common).stdout.splitlines()[-1])
    assert served["num_drafts"] > 0 and len(served["accept_rate_per_position"]) == 3
    assert served["exact_match"] and served["tau"] >= 1.0
    ours = json.loads(dataflow("eval", *common).stdout.splitlines()[-1])
    assert abs(served["tau"] - ours["tau"]) <= 0.1, (served, ours)
