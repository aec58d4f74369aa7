"""End to end: the same N samples three ways, in one run, each process on one torch thread.

    pipelined   `dataflow rollout` ‖ `dataflow train` on one DB, features through the shm arena
    drain       rollout everything first (arena large enough), then train
    offline     rollout writes every sample's features to disk (files store), then train reads the files
                (what offline pipelines do: dump hidden states, then fit)

Prints one JSON object last: samples/s of each, speedup_vs_drain, speedup_vs_offline, the pipelined
trainer's data-wait fraction, peak in-flight bytes and disk bytes written.

    python scripts/bench_e2e.py            # 256 bundled samples on SmolLM2; the trainer a bit slower than the rollout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dataflow.control.db import connect
from dataflow.control.queue import RefQueue

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class PeakSampler(threading.Thread):
    """Polls the run's in-flight feature bytes and a directory's size; keeps the maxima."""

    def __init__(self, db: Path, store_dir: Path | None):
        super().__init__(daemon=True)
        self.db, self.store_dir = db, store_dir
        self.peak_inflight = self.peak_disk = 0
        self.done = threading.Event()

    def run(self) -> None:
        queue = None
        while not self.done.wait(0.2):
            if queue is None and self.db.exists():
                queue = RefQueue(connect(self.db))
            if queue is not None:
                self.peak_inflight = max(self.peak_inflight, queue.live_bytes())
            if self.store_dir and self.store_dir.exists():
                size = sum(p.stat().st_size for p in self.store_dir.rglob("*") if p.is_file())
                self.peak_disk = max(self.peak_disk, size)


def commands(work: Path, args, store: str) -> dict[str, list[str]]:
    db = work / "run.sqlite"
    store_args = ["--store", store] + (["--store-dir", str(work / "features")] if store == "files" else [])
    rollout = [
        sys.executable, "-m", "dataflow", "rollout", "--db", str(db), "--num-samples", str(args.samples),
        "--max-length", str(args.max_length), "--threads", "1", "--token-budget", str(args.token_budget),
        "--tasks-per-lease", "4", "--draft-vocab-size", str(args.draft_vocab_size), "--no-progress",
        "--max-inflight-bytes", str(args.max_inflight_bytes), *store_args,
    ]
    train = [
        sys.executable, "-m", "dataflow", "train", "--db", str(db), "--out", str(work / "out"),
        "--batch-tokens", str(args.token_budget), "--ttt-length", str(args.ttt_length), "--log-every", "1",
        "--save-every", "1000000", "--exit-when-idle", "300", "--device", "cpu", "--no-progress",
    ]
    if args.target_model:
        rollout += ["--target-model", args.target_model]
    return {"rollout": rollout, "train": train}


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **ONE_THREAD})


def finish(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"bench_e2e: {proc.args[3]} failed (exit {proc.returncode}); see {log}:\n"
                         + log.read_text(errors="replace")[-2000:])


def data_wait_fraction(out: Path) -> float:
    """Time-weighted data-wait share of the trainer's logged steps (one row per step)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    durations = [1.0 / r["steps_per_s"] for r in rows]
    waited = sum(d * r["data_wait_pct"] / 100.0 for d, r in zip(durations, rows))
    return waited / sum(durations) if durations else 0.0


def run_mode(mode: str, root: Path, args) -> dict:
    work = root / mode
    work.mkdir(parents=True)
    cmds = commands(work, args, "files" if mode == "offline" else "shm")
    logs = {role: work / f"{role}.log" for role in cmds}
    sampler = PeakSampler(work / "run.sqlite", work / "features" if mode == "offline" else None)
    sampler.start()
    start = time.perf_counter()
    if mode == "pipelined":
        procs = {role: spawn(cmd, logs[role]) for role, cmd in cmds.items()}
        for role, proc in procs.items():
            finish(proc, logs[role])
    phases = {}
    if mode != "pipelined":
        for role, cmd in cmds.items():
            phase_start = time.perf_counter()
            finish(spawn(cmd, logs[role]), logs[role])
            phases[f"{role}_s"] = round(time.perf_counter() - phase_start, 2)
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    return {
        "wall_s": round(wall, 2),
        **phases,
        "samples_per_s": round(args.samples / wall, 4),
        "trainer_data_wait": round(data_wait_fraction(work / "out"), 4),
        "peak_inflight_bytes": sampler.peak_inflight,
        "disk_bytes_written": sampler.peak_disk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--target-model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--draft-vocab-size", type=int, default=2048)
    parser.add_argument("--ttt-length", type=int, default=4)
    parser.add_argument("--max-inflight-bytes", type=int, default=1 << 30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dataflow-bench-e2e-") as tmp:
        results = {mode: run_mode(mode, Path(tmp), args) for mode in ("pipelined", "drain", "offline")}
    pipelined = results["pipelined"]
    print(json.dumps({
        "n": args.samples,
        "threads_per_process": 1,
        **{f"{mode}_samples_per_s": r["samples_per_s"] for mode, r in results.items()},
        "speedup_vs_drain": round(pipelined["samples_per_s"] / results["drain"]["samples_per_s"], 3),
        "speedup_vs_offline": round(pipelined["samples_per_s"] / results["offline"]["samples_per_s"], 3),
        "pipelined_data_wait": pipelined["trainer_data_wait"],
        "peak_inflight_bytes": pipelined["peak_inflight_bytes"],
        "offline_disk_bytes_written": results["offline"]["disk_bytes_written"],
        "modes": results,
    }))


if __name__ == "__main__":
    main()
