"""The one test on the real target: `dataflow rollout` with no model flags runs SmolLM2-135M-Instruct."""

import subprocess
import sys

import pytest
import torch
from test_transport_support import abandon_run

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.rollout.data import load_dataset
from dataflow.rollout.template import tokenize_sample
from dataflow.target import resolve_target
from dataflow.transport import open_reader


@pytest.mark.slow
def test_rollout_runs_the_real_smollm2_end_to_end_on_a_few_samples(tmp_path):
    db = tmp_path / "run.sqlite"
    result = subprocess.run(
        [sys.executable, "-m", "dataflow", "rollout", "--db", str(db), "--num-samples", "3", "--max-length", "128",
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "rollout: 3 samples" in result.stdout
    conn = connect(db)
    try:
        meta = RunMeta(conn)
        target = meta.get("target")
        assert target["model"] == str(resolve_target()) and target["aux_layers"] == [2, 15, 27]
        assert target["hidden_size"] == 576 and target["vocab_size"] == 49152 and meta.end_of_stream()
        assert meta.get("vocab")["draft_vocab_size"] == 32000
        [lease] = RefQueue(conn).lease("test", n=1)
        features = open_reader(conn).open(lease.handle)
        T = len(features["input_ids"])
        assert features["aux_hidden"].shape == (T, 3 * 576) and features["target_hidden"].shape == (T, 576)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target["model"])
        sample = {s.id: s for s in load_dataset().samples}[lease.key]
        tokenized = tokenize_sample(tokenizer, sample, max_length=128)
        assert features["input_ids"].tolist() == tokenized.input_ids
        model = AutoModelForCausalLM.from_pretrained(target["model"])
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([tokenized.input_ids]), output_hidden_states=True)
        # the default dtype: bf16 where the CPU has native bf16 matmuls (then within bf16's error of fp32)
        assert str(features["target_hidden"].dtype) == f"torch.{target['dtype']}"
        for got, exact in ((features["aux_hidden"][:, 576:1152], out.hidden_states[15][0]),
                           (features["target_hidden"], out.hidden_states[-1][0])):
            tolerance = 1e-3 if got.dtype == torch.float32 else 0.05
            assert (got.float() - exact).norm() / exact.norm() < tolerance
        # de-quantised weights that work: the reference reply is far likelier than under a uniform guess
        # (mean NLL ln(49152) = 10.8 nats)
        mask = torch.tensor(tokenized.loss_mask[1:])
        nll = torch.nn.functional.cross_entropy(out.logits[0, :-1][mask], torch.tensor(tokenized.input_ids[1:])[mask])
        assert nll < 4.0
    finally:
        abandon_run(conn)
