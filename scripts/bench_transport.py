"""Hand one sample's features from a producer process to a consumer process: dataflow's arena vs the
alternatives, in the same run. Prints one JSON object last.

    .venv/bin/python scripts/bench_transport.py [--iters 15] [--warmup 3] [--threads 1]

Each iteration is timed from the producer holding the tensors to the consumer having touched every byte
(one sample in flight, clocks are CLOCK_MONOTONIC, shared by processes on a host). `copy_touch` is the
physical limit: a warm `copy_` into a preallocated buffer plus the same touch, in one process.
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
from pathlib import Path

import torch

SIZES = {  # name: (tokens, hidden, dtype)
    "48MiB_bf16": (3072, 2048, torch.bfloat16),  # aux [3072, 6144] + target [3072, 2048] bf16 = 48 MiB
    "smollm2_2048x4x576_fp32": (2048, 576, torch.float32),  # 18 MiB
}
METHODS = ["copy_touch", "arena", "arena_sqlite", "torch_save_load", "torch_save_load_mmap", "safetensors", "mp_queue"]
SHM = Path("/dev/shm")


def make_sample(tokens: int, hidden: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, 50_000, (tokens,)),
        "loss_mask": torch.ones(tokens, dtype=torch.bool),
        "aux_hidden": torch.randn(tokens, 3 * hidden).to(dtype),
        "target_hidden": torch.randn(tokens, hidden).to(dtype),
    }


def touch(tensors: dict[str, torch.Tensor]) -> int:
    """Read every byte once (what any consumer must at least do), at memory bandwidth: a float32 sum over
    the raw bytes vectorises (an int32 or bf16 sum runs ~20x slower and would hide every difference)."""
    total = 0.0
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8)
        total += float(flat.view(torch.float32).sum() if flat.numel() % 4 == 0 else flat.sum())
    return total


# ---- consumer process -------------------------------------------------------------------------------


def consumer(conn, queue, db: str, threads: int) -> None:
    torch.set_num_threads(threads)
    from dataflow.control.db import connect
    from dataflow.control.queue import RefQueue
    from dataflow.transport import open_reader

    refs = RefQueue(connect(db))
    reader = open_reader(refs.conn)
    while (msg := conn.recv()) is not None:
        method, payload = msg
        t_open = time.monotonic_ns()
        if method == "arena":
            tensors = reader.open(payload)
        elif method == "arena_sqlite":
            deadline = time.monotonic() + 60
            while not (leases := refs.lease("bench", n=1)):  # spin: we time the hand-off, not a poll interval
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no ref to lease for {payload}")
            tensors = reader.open(leases[0].handle)
        elif method == "mp_queue":
            tensors = queue.get()
        elif method == "safetensors":
            from safetensors.torch import load_file

            tensors = load_file(payload)
        else:
            tensors = torch.load(payload, mmap=method.endswith("mmap"), weights_only=True)
        opened = time.monotonic_ns()
        touch(tensors)
        if method == "arena_sqlite":
            reader.check(leases[0].handle)
            refs.ack([leases[0].token])
        elif method == "arena":
            reader.check(payload)
        del tensors
        conn.send((time.monotonic_ns(), opened - t_open))
    reader.close()


# ---- producer side (this process) -------------------------------------------------------------------


class Producer:
    """The producer side of every method, one sample at a time; state that must stay warm lives here."""

    def __init__(self, name, sample, pipe, queue, db_conn, writer):
        from dataflow.control.queue import RefQueue

        self.name, self.sample, self.pipe, self.queue, self.writer = name, sample, pipe, queue, writer
        self.refs = RefQueue(db_conn)
        self.dst = {k: torch.empty_like(v) for k, v in sample.items()}  # copy_touch's warm buffer

    def once(self, method: str, i: int) -> tuple[float, float]:
        """(latency ms, consumer open ms) of handing over one sample."""
        key, path = f"{self.name}-{method}-{i}", SHM / f"dataflow-bench-{os.getpid()}-{i}"
        # a producer hands over fresh tensors each step; mp_queue would otherwise resend shared ones for free
        sample = {k: v.clone() for k, v in self.sample.items()} if method == "mp_queue" else self.sample
        t0 = time.monotonic_ns()
        if method == "copy_touch":
            for k, v in sample.items():
                self.dst[k].copy_(v)
            touch(self.dst)
            return (time.monotonic_ns() - t0) / 1e6, 0.0
        payload = self._send(method, key, path, sample)
        self.pipe.send((method, payload))
        t1, open_ns = self.pipe.recv()
        if method == "arena":
            self.writer.abandon(payload)  # handed over a pipe, never committed: free its range by hand
        path.unlink(missing_ok=True)
        return (t1 - t0) / 1e6, open_ns / 1e6

    def _send(self, method, key, path, sample):
        from dataflow.control.queue import RefItem

        if method in ("arena", "arena_sqlite"):
            handle, nbytes = self.writer.write(key, sample)
            if method == "arena":
                return handle
            self.refs.put(RefItem(key, handle, nbytes, handle["store"]))
            return key
        if method == "mp_queue":
            self.queue.put(sample)
        elif method == "safetensors":
            from safetensors.torch import save_file

            save_file(sample, path)
        else:
            torch.save(sample, path)
        return str(path)


def bench_size(name, spec, args, pipe, queue, db_conn) -> dict:
    """Methods interleaved round by round, so drift in the machine's load hits them all alike."""
    from dataflow.transport import open_writer

    sample = make_sample(*spec)
    nbytes = sum(t.numel() * t.element_size() for t in sample.values())
    writer = open_writer(db_conn, store="shm", producer_id=f"bench-{name}", max_inflight_bytes=4 * nbytes + (1 << 20))
    producer = Producer(name, sample, pipe, queue, db_conn, writer)
    runs = {m: [] for m in METHODS}
    try:
        for i in range(args.warmup + args.iters):
            for m in METHODS:
                result = producer.once(m, i)
                if i >= args.warmup:
                    runs[m].append(result)
    finally:
        writer.close()
    methods = {
        m: {
            "median_ms": round(statistics.median(r[0] for r in rs), 3),
            "consumer_open_ms": round(statistics.median(r[1] for r in rs), 4),
        }
        for m, rs in runs.items()
    }
    copy_ms, save_ms = methods["copy_touch"]["median_ms"], methods["torch_save_load"]["median_ms"]
    for m in methods.values():
        m["ratio_vs_copy"] = round(m["median_ms"] / copy_ms, 3)
        m["speedup_vs_torch_save"] = round(save_ms / m["median_ms"], 2)
    return {"bytes": nbytes, "methods": methods}


def run_all(sizes: dict, args) -> tuple[dict, list[str]]:
    """Every size and method against one consumer process; returns results and arenas left behind."""
    from dataflow.control.db import connect
    from dataflow.transport import sweep

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.sqlite")
        db_conn = connect(db)
        queue = ctx.Queue()
        pipe, child_end = ctx.Pipe()
        child = ctx.Process(target=consumer, args=(child_end, queue, db, args.threads), daemon=True)
        child.start()
        try:
            results = {name: bench_size(name, spec, args, pipe, queue, db_conn) for name, spec in sizes.items()}
        finally:
            pipe.send(None)
            child.join(30)
        return results, sweep(db_conn).kept_segments


def targets(results: dict) -> dict:
    arena_big = results["48MiB_bf16"]["methods"]["arena"]
    arena_small = results["smollm2_2048x4x576_fp32"]["methods"]["arena"]
    return {
        "arena_ratio_vs_copy": arena_big["ratio_vs_copy"],
        "arena_le_1_5x_copy": arena_big["ratio_vs_copy"] <= 1.5,
        "arena_speedup_vs_torch_save": arena_big["speedup_vs_torch_save"],
        "arena_ge_4x_torch_save": arena_big["speedup_vs_torch_save"] >= 4,
        "consumer_open_ms_48MiB_vs_18MiB": [arena_big["consumer_open_ms"], arena_small["consumer_open_ms"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--smoke", action="store_true", help="tiny samples, one round (a test that it runs)")
    args = parser.parse_args()
    sizes = {name: (16, 8, dtype) for name, (_, _, dtype) in SIZES.items()} if args.smoke else SIZES
    if args.smoke:
        args.iters, args.warmup = 1, 0
    torch.set_num_threads(args.threads)
    results, leftover = run_all(sizes, args)
    for name, r in results.items():
        print(f"{name}: " + ", ".join(f"{m} {v['median_ms']} ms" for m, v in r["methods"].items()), file=sys.stderr)
    report = {"benchmark": "transport", "threads_per_process": args.threads, "iters": args.iters, "sizes": results,
              "targets_48MiB": targets(results), "arenas_left_after_sweep": leftover}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
