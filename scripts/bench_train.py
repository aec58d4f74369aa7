"""The trainer's optimiser step at SmolLM2 draft shapes, fp32 against bf16, next to the matmul roofline
measured in the same run at the step's own matmul shapes and threads. Prints one JSON object last.

    .venv/bin/python scripts/bench_train.py [--steps 3] [--warmup 1] [--threads 2] [--modes fp32,bf16]
    .venv/bin/python scripts/bench_train.py --modes bf16,specforge --specforge-source DIR   # + SpecForge's step

Shapes: draft H 576, I 1536, 9/3 heads, target vocab 49152, draft vocab 8192, 8 x 256 tokens, TTT 7;
random weights. The draft vocabulary holds every teacher top-1 of the batch, so every position carries loss
(the most work a step can have). aux_hidden's third slice is target_hidden, so the draft can learn the
batch and acc_0 moves; every mode trains the same steps on the same data from the same init.

Per mode: tokens/s and achieved GFLOP/s (FLOPs counted by FlopCounterMode over one forward+backward), the
roofline (every matmul the step runs, replayed alone with the same shapes, strides and dtype right after
each timed step: their summed time is the step's matmul-only time; fraction = that / the step's time; and,
as the issues quote it, achieved GFLOP/s over torch.mm's at 2048x576 @ 576x8192 measured after each step,
both in this process and in a bare one: a plain script's measure, issue 17's yardstick), a
torch.profiler split of one step into matmul vs everything else, and `step_working_set_bytes` (peak RSS
over two steps minus RSS after build, each mode alone in a child process). The modes' steps are
interleaved in one process, so load from other processes on a shared machine hits them alike. `compile_s`:
the first step's extra time, with a fresh inductor cache (what a trainer's first start pays).
Mode `specforge` (with --specforge-source) times SpecForge's own training step on the same problem, in the
same rounds, with the same measures: the peer that issue 17 compares against (scripts/peer_specforge.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

H, INTER, HEADS, KV_HEADS, VOCAB, DRAFT_VOCAB, BATCH, SEQ, TTT = 576, 1536, 9, 3, 49152, 8192, 8, 256, 7
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
PROFILED_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}


@dataclass
class Problem:
    """The bench's draft shapes, frozen weights, vocabulary and batch: what every mode (and the peer) trains on."""

    seed: int
    config: object  # dataflow.train.eagle3.DraftConfig
    lm_head: torch.Tensor  # (VOCAB, H) fp32, the frozen target head
    embed_tokens: torch.Tensor  # (VOCAB, H) fp32
    vocab: object  # dataflow.train.vocab.DraftVocab
    batch: object  # dataflow.train.source.MicroBatch


def problem(seed: int) -> Problem:
    from dataflow.train.eagle3 import DraftConfig
    from dataflow.train.source import MicroBatch
    from dataflow.train.vocab import vocab_from_target_ids

    gen = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(VOCAB, H, generator=gen) * 0.05
    target_hidden = torch.randn(BATCH, SEQ, H, generator=gen)
    aux = torch.cat([torch.randn(BATCH, SEQ, 2 * H, generator=gen), target_hidden], dim=-1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    tops = (target_hidden.reshape(-1, H) @ lm_head.T).argmax(-1).unique()
    others = torch.randperm(VOCAB, generator=gen)
    others = others[~torch.isin(others, tops)][: DRAFT_VOCAB - tops.numel()]
    vocab = vocab_from_target_ids(torch.cat([tops, others]), VOCAB)
    cfg = DraftConfig(hidden_size=H, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=H // HEADS, vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB, target_hidden_size=H)
    batch = MicroBatch(input_ids=ids, loss_mask=torch.ones(BATCH, SEQ, dtype=torch.bool), aux_hidden=aux,
                       target_hidden=target_hidden)
    return Problem(seed=seed, config=cfg, lm_head=lm_head, embed_tokens=torch.randn(VOCAB, H, generator=gen) * 0.05,
                   vocab=vocab, batch=batch)


PEER = "specforge"  # the mode that runs SpecForge's own step (scripts/peer_specforge.py)


def build_problem(mode: str, seed: int, peer_source: Path | None = None, *, compile: bool = True):
    """(step, batch) of a mode: fp32, bf16 and bf16-eager are the trainer's TrainStep, PEER is SpecForge's."""
    from dataflow.train.config import TrainConfig
    from dataflow.train.eagle3 import Eagle3Draft
    from dataflow.train.step import TrainStep

    p = problem(seed)
    if mode == PEER:
        from peer_specforge import PeerStep

        return PeerStep(peer_source, p, ttt=TTT, lr=1e-3), p.batch
    torch.manual_seed(seed)
    draft = Eagle3Draft(p.config, embed_tokens=p.embed_tokens, d2t=p.vocab.d2t, t2d=p.vocab.t2d)
    config = TrainConfig(lr=1e-3, warmup_steps=0, decay="none", ttt_length=TTT, dtype=dtype_of(mode))
    step = TrainStep(draft, p.lm_head, config, device=torch.device("cpu"),
                     compile=compile and not mode.endswith("-eager"))
    return step, p.batch


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_rss_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


class MatmulShapes(TorchDispatchMode):
    """Records every matmul's (op, shapes, strides, dtype) so it can be replayed alone."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            tensors = tuple((tuple(a.shape), a.stride(), a.dtype) for a in args if isinstance(a, torch.Tensor))
            self.calls[(func, tensors)] += 1
        return func(*args, **(kwargs or {}))


class Clock:
    """Wall and process CPU seconds (all threads). The machine is shared: CPU seconds are the steadier
    measure when other processes take cores; both are reported."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def replay(calls: Counter) -> tuple[float, float]:
    """The matmuls' summed (wall, cpu) seconds, each run alone on fresh operands (after one untimed run)."""
    wall = cpu = 0.0
    for (func, tensors), count in calls.items():
        operands = [torch.empty_strided(shape, stride, dtype=dtype).normal_() for shape, stride, dtype in tensors]
        func(*operands)
        with Clock() as clock:
            for _ in range(count):
                func(*operands)
        wall, cpu = wall + clock.wall, cpu + clock.cpu
    return wall, cpu


REFERENCE_MM = (BATCH * SEQ, H, DRAFT_VOCAB)  # the draft head's matmul: the issues' "2048x576 @ 576x8192" roofline


def reference_gflop_per_s(dtype: torch.dtype, repeats: int = 10) -> float:
    """torch.mm at the reference shape, the roofline the issues quote (bf16 530-770 GFLOP/s there, measured
    alone; ~930-960 inside this process, after keep_freed_memory and a step's warm-up)."""
    m, k, n = REFERENCE_MM
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    with Clock() as clock:
        for _ in range(repeats):
            a @ b
    return 2 * m * k * n * repeats / clock.wall / 1e9


def bare_reference(threads: int, requests, replies) -> None:
    """reference_gflop_per_s on request, in a process of its own with glibc's default allocator settings: how
    a plain script measures it (its 32 MiB product is a fresh mapping, page-faulted anew on every call)."""
    torch.set_num_threads(threads)
    while (dtype := requests.get()) is not None:
        replies.put(reference_gflop_per_s(dtype))


class BareReference:
    """The bare process of bare_reference, asked once per timed step, so load hits it like the step."""

    def __init__(self, threads: int):
        ctx = mp.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=bare_reference, args=(threads, self.requests, self.replies), daemon=True)
        self.process.start()

    def measure(self, dtype: torch.dtype) -> float:
        self.requests.put(dtype)
        return self.replies.get()

    def close(self) -> None:
        self.requests.put(None)
        self.process.join()


def dtype_of(mode: str) -> str:
    """bf16-eager -> bf16: the mode's compute dtype (its suffix only says how it runs)."""
    return mode.partition("-")[0]


class Round(NamedTuple):
    """One timed step of a mode, and what it is measured against right after it."""

    wall: float
    cpu: float
    matmul_wall: float  # the step's matmuls replayed alone
    matmul_cpu: float
    reference: float  # GFLOP/s of torch.mm at REFERENCE_MM, in this process
    bare_reference: float  # the same in a bare process


def train_step(step, batch, index: int, n_tokens: float) -> float:
    _, sums = step.accumulate(batch, n_tokens)
    step.update(step=index, samples=index * BATCH)
    return float(sums.correct[0]) / max(float(sums.count[0]), 1.0)


def count_step(step, batch, n_tokens: float) -> tuple[float, Counter]:
    """FLOPs and matmul calls of one forward+backward (optimizer excluded: no matmuls, <1% of the FLOPs)."""
    shapes, flops = MatmulShapes(), FlopCounterMode(display=False)
    with flops, shapes:
        step.accumulate(batch, n_tokens)
    return flops.get_total_flops(), shapes.calls


def count_in_child(mode: str, seed: int, peer_source: Path | None, queue) -> None:
    """count_step of a mode, eagerly where the mode allows it, in a process of its own: a compiled step that once
    runs under a dispatch mode runs eagerly from then on (measured: 1.30 s -> 1.80 s per bf16 step), and the peer
    compiles at import, so no counted step may share the timed steps' process."""
    from dataflow.train.loss import loss_tokens

    step, batch = build_problem(mode, seed, peer_source, compile=False)
    flops, calls = count_step(step, batch, float(loss_tokens(batch.loss_mask)))
    queue.put((flops, Counter({(str(func), tensors): n for (func, tensors), n in calls.items()})))


def in_child(target, *args):
    """target(*args, queue) in a fresh spawned process; what it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def counted(mode: str, seed: int, peer_source: Path | None) -> tuple[float, Counter]:
    """FLOPs and matmul calls of one step of `mode` (count_in_child), the matmuls ready to replay."""
    flops, calls = in_child(count_in_child, mode, seed, peer_source)
    by_name = {str(func): func for func in MATMULS}
    return flops, Counter({(by_name[name], tensors): n for (name, tensors), n in calls.items()})


def profile_split(step, batch, index: int, n_tokens: float) -> dict:
    """torch.profiler over one step: self time of the matmul kernels vs the rest of the step's wall time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, Clock() as clock:
        train_step(step, batch, index, n_tokens)
    matmul = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PROFILED_MATMULS) / 1e6
    return {"step_s": clock.wall, "matmul_s": matmul, "other_s": clock.wall - matmul}


def timing(modes: list[str], steps: int, warmup: int, threads: int, seed: int, peer_source: Path | None) -> dict:
    """All modes in one process, their steps interleaved round by round, each step followed by its matmul
    replay: load from other processes hits every mode and its roofline alike."""
    from dataflow.train.loss import loss_tokens
    from dataflow.train.step import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    built = {mode: build_problem(mode, seed, peer_source) for mode in modes}
    n_tokens = float(loss_tokens(next(iter(built.values()))[1].loss_mask))
    # bf16 and bf16-eager run the same matmuls
    counts = {dtype: counted(dtype, seed, peer_source) for dtype in {dtype_of(mode) for mode in modes}}
    acc0 = {mode: [] for mode in modes}
    rounds = {mode: [] for mode in modes}
    first = {}
    bare = BareReference(threads)
    for i in range(warmup + steps):
        for mode, (step, batch) in built.items():
            with Clock() as clock:
                acc0[mode].append(train_step(step, batch, i, n_tokens))
            first.setdefault(mode, clock)
            if i >= warmup:
                rounds[mode].append(Round(clock.wall, clock.cpu, *replay(counts[dtype_of(mode)][1]),
                                          reference_gflop_per_s(step.dtype), bare.measure(step.dtype)))
            print(f"round {i} {mode}: step {clock.wall:.2f}s wall, {clock.cpu:.2f}s cpu"
                  + (f"; its matmuls alone {rounds[mode][-1].matmul_wall:.2f}s" if i >= warmup else ""), file=sys.stderr, flush=True)
    bare.close()
    out = {}
    for mode, (step, batch) in built.items():
        flops = counts[dtype_of(mode)][0]
        runs = rounds[mode]
        wall = statistics.median(r.wall for r in runs)
        cpu = statistics.median(r.cpu for r in runs)
        out[mode] = {
            "step_s": wall,
            "step_s_range": [min(r.wall for r in runs), max(r.wall for r in runs)],
            "step_cpu_s": cpu,
            "tokens_per_s": BATCH * SEQ / wall,
            "gflop_per_step": flops / 1e9,
            "gflop_per_s": flops / wall / 1e9,
            "roofline_gflop_per_s": statistics.median(flops / r.matmul_wall / 1e9 for r in runs),
            "fraction_of_roofline": statistics.median(r.matmul_wall / r.wall for r in runs),
            # the step's GFLOP/s over the one reference matmul's, as the issues quote the roofline
            "reference_roofline_gflop_per_s": statistics.median(r.reference for r in runs),
            "fraction_of_reference_roofline": statistics.median(flops / r.wall / 1e9 / r.reference for r in runs),
            # the same matmul timed in a bare process (bare_reference): the yardstick of issue 17's peer table
            "bare_reference_roofline_gflop_per_s": statistics.median(r.bare_reference for r in runs),
            "fraction_of_bare_reference_roofline": statistics.median(flops / r.wall / 1e9 / r.bare_reference for r in runs),
            "fraction_of_roofline_cpu_time": statistics.median(r.matmul_cpu / r.cpu for r in runs),
            "profile": profile_split(step, batch, warmup + steps, n_tokens),
            # the first step's extra time: torch.compile (forward and backward graphs) and first-touch allocation
            "compile_s": first[mode].wall - wall,
            "compile_cpu_s": first[mode].cpu - cpu,
            "acc0": acc0[mode],
        }
    return out


def working_set(mode: str, steps: int, threads: int, seed: int, peer_source: Path | None, queue) -> None:
    """Peak RSS over `steps` steps minus RSS after build, alone in this process."""
    from dataflow.train.loss import loss_tokens
    from dataflow.train.step import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    step, batch = build_problem(mode, seed, peer_source)
    n_tokens = float(loss_tokens(batch.loss_mask))
    built = rss_bytes()
    reset_peak_rss()
    for i in range(steps):
        train_step(step, batch, i, n_tokens)
    queue.put(peak_rss_bytes() - built)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (one step per mode each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first rounds (compile, allocator); >= 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="fp32,bf16",
                        help=f"fp32, bf16, bf16-eager (no torch.compile), {PEER} (SpecForge's own step)")
    parser.add_argument("--specforge-source", type=Path, default=None,
                        help=f"a SpecForge checkout, for the {PEER} mode (scripts/peer_specforge.py)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: the first round compiles")
    modes = args.modes.split(",")
    if PEER in modes and args.specforge_source is None:
        parser.error(f"--modes {PEER} needs --specforge-source DIR (a checkout of github.com/sgl-project/SpecForge)")
    # A fresh inductor cache: compile_s is what a trainer pays on its first start on a fresh machine.
    cache = tempfile.TemporaryDirectory(prefix="bench-train-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    memory = {}
    for mode in modes:  # each alone in a fresh process: nothing else's allocations in its RSS
        memory[mode] = in_child(working_set, mode, 2, args.threads, args.seed, args.specforge_source)
        print(f"{mode}: working set {memory[mode] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=cache.name)  # not the children's graphs
    results = timing(modes, args.steps, args.warmup, args.threads, args.seed, args.specforge_source)
    for mode, r in results.items():
        r["step_working_set_bytes"] = memory[mode]
        print(f"{mode}: {r['tokens_per_s']:.0f} tokens/s, {r['gflop_per_s']:.0f} GFLOP/s "
              f"({r['fraction_of_roofline']:.0%} of its {r['roofline_gflop_per_s']:.0f} GFLOP/s matmul roofline; "
              f"{r['fraction_of_roofline_cpu_time']:.0%} in CPU time; {r['fraction_of_reference_roofline']:.0%} of "
              f"{r['reference_roofline_gflop_per_s']:.0f} GFLOP/s at the reference {REFERENCE_MM}, "
              f"{r['fraction_of_bare_reference_roofline']:.0%} of its {r['bare_reference_roofline_gflop_per_s']:.0f} "
              f"GFLOP/s in a bare process); profiled step: matmul "
              f"{r['profile']['matmul_s']:.2f}s + other {r['profile']['other_s']:.2f}s; "
              f"first step +{r['compile_s']:.0f}s ({r['compile_cpu_s']:.0f}s cpu; compile); "
              f"working set {r['step_working_set_bytes'] / 2**30:.2f} GiB", flush=True)
    summary = {"shapes": {"hidden": H, "intermediate": INTER, "heads": [HEADS, KV_HEADS], "vocab": VOCAB,
                          "draft_vocab": DRAFT_VOCAB, "batch": [BATCH, SEQ], "ttt": TTT, "threads": args.threads},
               "modes": results}
    if "fp32" in results and "bf16" in results:
        fp32, bf16 = results["fp32"], results["bf16"]
        summary |= {
            "bf16_speedup_vs_fp32": fp32["step_s"] / bf16["step_s"],
            "bf16_speedup_vs_fp32_cpu_time": fp32["step_cpu_s"] / bf16["step_cpu_s"],
            "bf16_fraction_of_roofline": bf16["fraction_of_roofline"],
            "bf16_fraction_of_reference_roofline": bf16["fraction_of_reference_roofline"],
            "bf16_fraction_of_bare_reference_roofline": bf16["fraction_of_bare_reference_roofline"],
            "bf16_fraction_of_roofline_cpu_time": bf16["fraction_of_roofline_cpu_time"],
            "acc0_diff_bf16_vs_fp32": max(abs(a - b) for a, b in zip(fp32["acc0"], bf16["acc0"])),
            "step_working_set_bytes": bf16["step_working_set_bytes"],
            "bf16_matmul_s": bf16["profile"]["matmul_s"],
            "bf16_other_s": bf16["profile"]["other_s"],
            "bf16_compile_s": bf16["compile_s"],
        }
    if PEER in results and "bf16" in results:
        peer, bf16 = results[PEER], results["bf16"]
        summary |= {
            f"bf16_speedup_vs_{PEER}": peer["step_s"] / bf16["step_s"],
            f"bf16_speedup_vs_{PEER}_cpu_time": peer["step_cpu_s"] / bf16["step_cpu_s"],
            f"{PEER}_fraction_of_roofline": peer["fraction_of_roofline"],
            f"{PEER}_fraction_of_bare_reference_roofline": peer["fraction_of_bare_reference_roofline"],
            f"{PEER}_step_working_set_bytes": peer["step_working_set_bytes"],
        }
    cache.cleanup()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
