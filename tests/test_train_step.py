"""The optimiser step: bf16 against fp32 on the tiny target's real features, the compile fallback, the
learning-rate schedule and the expected-acceptance estimate."""

import dataclasses
import math

import pytest
import torch

from dataflow.train.build import build_draft
from dataflow.train.config import TrainConfig
from dataflow.train.loss import CompiledOrEager, loss_tokens
from dataflow.train.metrics import Window, expected_acceptance
from dataflow.train.schedule import LrSchedule
from dataflow.train.source import MicroBatch
from dataflow.train.step import TrainStep
from dataflow.train.target import load_target_head
from dataflow.train.testing import build_tiny_target, draft_vocab_for, target_record, tiny_features
from dataflow.ui import draft_line


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """The tiny target's draft and one padded micro-batch of its real features."""
    target = build_tiny_target(tmp_path_factory.mktemp("target") / "tiny")
    samples = tiny_features(target, [64] * 8)  # 256 positions with loss: one flip moves acc_0 by 0.004
    head = load_target_head(target)
    vocab = draft_vocab_for(samples, head.lm_head, 160)
    T = max(s["input_ids"].shape[0] for s in samples)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, T - t.shape[0]) if t.dim() == 2 else (0, T - t.shape[0]))
    batch = MicroBatch(*(torch.stack([pad(s[name]) for s in samples])
                         for name in ("input_ids", "loss_mask", "aux_hidden", "target_hidden")))
    return target_record(target), vocab, batch


def new_step(problem, dtype: str, *, compile: bool = False, ttt_length: int = 2, device: str = "cpu") -> TrainStep:
    target, vocab, _ = problem
    config = TrainConfig(lr=3e-3, warmup_steps=0, ttt_length=ttt_length, dtype=dtype)
    model, head = build_draft(target, vocab, config)
    return TrainStep(model, head.lm_head, config, device=torch.device(device), compile=compile)


def test_the_bf16_step_computes_in_bf16_and_keeps_fp32_master_weights(problem):
    step = new_step(problem, "bf16")
    assert step.model.fc.weight.dtype == torch.bfloat16 and step.head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in step.params)
    assert {s["exp_avg"].dtype for s in step.optimizer.state.values()} <= {torch.float32}
    _, _, batch = problem
    before = step.master.fc.weight.detach().clone()
    step.accumulate(batch, float(loss_tokens(batch.loss_mask)))
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in step.params)
    assert all(p.grad is None for p in step.model.parameters())  # moved to the master weights
    step.update(step=0, samples=8)
    assert not torch.equal(step.master.fc.weight, before)
    assert torch.equal(step.model.fc.weight, step.master.fc.weight.to(torch.bfloat16))  # the copy follows


def test_one_bf16_step_has_the_fp32_loss_and_gradient_within_bf16_tolerance(problem):
    _, _, batch = problem
    n_tokens = float(loss_tokens(batch.loss_mask))
    results = {}
    for dtype in ("fp32", "bf16"):
        step = new_step(problem, dtype)
        weighted, sums = step.accumulate(batch, n_tokens)
        results[dtype] = (float(weighted) / n_tokens, step.master.lm_head.weight.grad, sums.count)
    (fp32_loss, fp32_grad, fp32_count), (bf16_loss, bf16_grad, bf16_count) = results["fp32"], results["bf16"]
    assert fp32_loss > 0.1 and abs(bf16_loss - fp32_loss) <= 0.01 * fp32_loss, (fp32_loss, bf16_loss)
    cosine = torch.nn.functional.cosine_similarity(fp32_grad.flatten(), bf16_grad.flatten(), dim=0)
    assert cosine > 0.99, cosine
    assert sum(fp32_count) > 0 and abs(sum(bf16_count) - sum(fp32_count)) <= 0.02 * sum(fp32_count)


def test_a_short_bf16_run_follows_the_fp32_acc0_curve_within_two_points(problem):
    _, _, batch = problem
    n_tokens = float(loss_tokens(batch.loss_mask))
    curves = {}
    for dtype in ("fp32", "bf16"):
        step, curve = new_step(problem, dtype), []
        for i in range(8):
            _, sums = step.accumulate(batch, n_tokens)
            step.update(step=i, samples=8 * i)
            curve.append(float(sums.correct[0]) / sums.count[0])
        curves[dtype] = curve
    assert curves["fp32"][-1] > curves["fp32"][0] + 0.2, curves  # it learns, so the comparison means something
    assert max(abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])) <= 0.02, curves


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_the_compiled_bf16_step_has_the_eager_fp32_loss_and_compiles_once_for_every_batch_shape(
        problem, device, monkeypatch, capsys):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)  # tests/conftest.py turns compilation off
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    torch._dynamo.reset()
    _, _, batch = problem
    cut = MicroBatch(*(x[:5, :-3] for x in dataclasses.astuple(batch)))  # another size and length: no recompile
    results = {}
    for dtype, compile, on in (("fp32", False, "cpu"), ("bf16", True, device)):
        step = new_step(problem, dtype, compile=compile, ttt_length=3, device=on)
        losses = []
        for b in (batch, cut):
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            b = MicroBatch(*(x.to(on) for x in dataclasses.astuple(b)))
            losses.append(float(step.accumulate(b, float(loss_tokens(b.loss_mask)))[0]))
        results[dtype] = (losses, *(p.grad.cpu() for p in (step.master.lm_head.weight,
                                                            step.master.midlayer.self_attn.k_proj.weight)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the second shape reused them
    assert "torch.compile failed" not in capsys.readouterr().err
    (fp32_losses, *fp32_grads), (bf16_losses, *bf16_grads) = results["fp32"], results["bf16"]
    for fp32, bf16 in zip(fp32_losses, bf16_losses):
        assert fp32 > 0.1 and abs(bf16 - fp32) <= 0.01 * fp32, (fp32_losses, bf16_losses)
    for fp32, bf16 in zip(fp32_grads, bf16_grads):
        assert torch.nn.functional.cosine_similarity(fp32.flatten(), bf16.flatten(), dim=0) > 0.99


def test_a_failing_compile_falls_back_to_eager_with_one_warning(capsys):
    calls = []
    wrapped = CompiledOrEager(lambda x: calls.append(x) or x * 2, compile=True, what="the loss")

    def broken(*args):
        raise RuntimeError("inductor: no C++ compiler\nlong trace")

    wrapped.compiled = broken
    assert wrapped(3) == 6 and wrapped(4) == 8 and calls == [3, 4]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed (RuntimeError: inductor: no C++ compiler)" in err[0], err


def schedule(**kw) -> LrSchedule:
    return LrSchedule(**({"peak": 1.0, "warmup": 0.1, "warmup_steps": 4, "decay": "cosine", "min_ratio": 0.1} | kw))


def test_the_schedule_warms_up_over_a_fraction_then_decays_to_the_floor_at_the_known_total():
    cosine, linear = schedule(total=100), schedule(total=100, decay="linear")
    f = lambda s, samples: s.factor(step=0, samples=samples)
    assert f(cosine, 0) == pytest.approx(0.01) and f(cosine, 5) == pytest.approx(0.5)  # never 0, linear warmup
    assert f(cosine, 10) == pytest.approx(1.0) and f(cosine, 100) == pytest.approx(0.1) == f(cosine, 150)
    assert f(cosine, 55) == pytest.approx(0.55) == f(linear, 55)  # halfway through the decay
    assert f(cosine, 32.5) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert f(linear, 32.5) == pytest.approx(0.775)
    assert f(schedule(total=100, decay="none"), 80) == 1.0


def test_the_schedule_counts_steps_with_max_steps_and_holds_the_peak_when_open_ended():
    steps = schedule(total=20, unit="steps")
    assert steps.factor(step=20, samples=0) == pytest.approx(0.1) and steps.factor(step=2, samples=10**6) == 1.0
    open_ended = schedule(total=0)
    assert [open_ended.factor(step=s, samples=0) for s in (0, 1, 3, 1000)] == [0.25, 0.5, 1.0, 1.0]
    restored = schedule()
    restored.load_state_dict(steps.state_dict())
    assert restored.factor(step=7, samples=3) == steps.factor(step=7, samples=3)


def test_tau_hat_is_one_plus_the_sum_of_the_chained_acceptances():
    assert expected_acceptance([]) == 1.0
    assert expected_acceptance([0.5, 0.5, 0.4]) == pytest.approx(1 + 0.5 + 0.25 + 0.1)
    window = Window()
    window.add(loss=1.0, loss_sum=[1.0, 1.0], correct=[8.0, 3.0], count=[10.0, 10.0], samples=1, tokens=10)
    assert window.summary(1, 1e-4)["tau_hat"] == pytest.approx(1 + 0.8 + 0.8 * 0.3)


def test_status_shows_the_trainers_tau_hat():
    line = draft_line({"step": 30, "loss": 1.25, "acc_0": 0.5, "tau_hat": 1.75})
    assert line == "step 30, loss 1.250, acc_0 0.500, tau-hat 1.75"


def test_bf16_features_from_the_rollout_train_like_fp32_ones(problem):
    _, _, batch = problem
    as_bf16 = MicroBatch(batch.input_ids, batch.loss_mask, batch.aux_hidden.bfloat16(), batch.target_hidden.bfloat16())
    n_tokens = float(loss_tokens(batch.loss_mask))
    for dtype in ("fp32", "bf16"):
        losses = [float(new_step(problem, dtype).accumulate(b, n_tokens)[0]) for b in (batch, as_bf16)]
        assert abs(losses[1] - losses[0]) <= 0.02 * losses[0], (dtype, losses)
