"""Benchmark dataflow's ref queue against litequeue and persist-queue (SQLiteAckQueue), in one run, on fresh files.

    (a) backlog: put N items, then one consumer leases and acks them all with the full backlog waiting
    (b) concurrent: one producer process and two consumer processes at the same time (median of --repeats)

Every item is checked for duplicates and loss. The last line printed is one JSON object. dataflow leases,
acks and puts in batches (`--batch`); `dataflow_unbatched` is the same queue one item per call, for reference.

    python scripts/bench_queue.py [--n 20000] [--batch 64] [--repeats 3] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dataflow.control.db import connect
from dataflow.control.queue import RefItem, RefQueue

BACKENDS = ("dataflow", "dataflow_unbatched", "litequeue", "persistqueue")
TARGET_BACKLOG_RATIO, TARGET_CONC_RATIO = 20.0, 5.0
IDLE_SLEEP_S = 0.001


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    n: int = 20_000
    """items per scenario"""
    batch: int = 64
    """dataflow's put / lease / ack batch size"""
    workdir: Path
    """fresh files go here (one subfolder per backend and scenario)"""
    backends: tuple[str, ...] = BACKENDS
    repeats: int = 3
    """runs of (b) per backend; the median counts"""

    def __post_init__(self):
        if self.n < 1 or self.batch < 1 or self.repeats < 1:
            raise ValueError("--n, --batch and --repeats must be >= 1")
        unknown = set(self.backends) - set(BACKENDS)
        if unknown or not {"dataflow", "litequeue"} <= set(self.backends):
            raise ValueError(f"--backends: pick from {', '.join(BACKENDS)}, including dataflow and litequeue")


class DataflowQueue:
    """dataflow's RefQueue: put_many / lease(n) / ack(tokens)."""

    def __init__(self, path: Path, batch: int):
        self.conn = connect(path / "run.sqlite")
        self.queue, self.batch = RefQueue(self.conn), batch

    def put_all(self, keys: list[str]) -> None:
        for start in range(0, len(keys), self.batch):
            chunk = keys[start : start + self.batch]
            self.queue.put_many([RefItem(key=k, handle={"k": k}, nbytes=0, store="bench") for k in chunk])

    def take(self, owner: str) -> list[tuple[str, str]]:
        return [(lease.key, lease.token) for lease in self.queue.lease(owner, n=self.batch, ttl=300.0)]

    def ack(self, receipts: list[str]) -> None:
        refused = self.queue.ack(receipts)
        if refused:
            raise RuntimeError(f"dataflow refused {len(refused)} acks")

    def close(self) -> None:
        self.conn.close()


class LiteQueueAdapter:
    """litequeue.LiteQueue: put / pop / done, one message per call (its API has no batch)."""

    def __init__(self, path: Path, batch: int):
        from litequeue import LiteQueue

        path.mkdir(parents=True, exist_ok=True)
        self.queue = LiteQueue(str(path / "queue.sqlite"), timeout=60)

    def put_all(self, keys: list[str]) -> None:
        for key in keys:
            self.queue.put(key)

    def take(self, owner: str) -> list[tuple[str, str]]:
        message = self.queue.pop()
        return [] if message is None else [(message.data, message.message_id)]

    def ack(self, receipts: list[str]) -> None:
        for message_id in receipts:
            self.queue.done(message_id)

    def close(self) -> None:
        self.queue.close()


class PersistQueueAdapter:
    """persistqueue.SQLiteAckQueue: put / get(block=False) / ack(id), one item per call."""

    def __init__(self, path: Path, batch: int):
        from persistqueue import SQLiteAckQueue

        # auto_resume=False: otherwise every opening process would un-lease the items other consumers hold
        self.queue = SQLiteAckQueue(str(path), auto_resume=False, multithreading=True, timeout=60)

    def put_all(self, keys: list[str]) -> None:
        for key in keys:
            self.queue.put(key)

    def take(self, owner: str) -> list[tuple[str, int]]:
        from persistqueue.exceptions import Empty

        try:
            item = self.queue.get(block=False, raw=True)
        except Empty:
            return []
        return [(item["data"], item["pqid"])]

    def ack(self, receipts: list[int]) -> None:
        for pqid in receipts:
            self.queue.ack(id=pqid)

    def close(self) -> None:
        self.queue.close()


def open_queue(backend: str, path: Path, batch: int):
    if backend == "dataflow":
        return DataflowQueue(path, batch)
    if backend == "dataflow_unbatched":
        return DataflowQueue(path, 1)
    if backend == "litequeue":
        return LiteQueueAdapter(path, batch)
    return PersistQueueAdapter(path, batch)


def drain(queue, owner: str, producer_done=None) -> list[str]:
    """Take and ack until empty (and, when concurrent, until the producer is done too)."""
    got: list[str] = []
    while True:
        done_before = producer_done is None or producer_done.is_set()  # read first: no put can follow it
        taken = queue.take(owner)
        if not taken:
            if done_before:
                return got
            time.sleep(IDLE_SLEEP_S)
            continue
        queue.ack([receipt for _, receipt in taken])
        got += [key for key, _ in taken]


def check(keys: list[str], got: list[str]) -> dict:
    unique = set(got)
    return {"duplicates": len(got) - len(unique), "lost": len(set(keys) - unique)}


def run_backlog(backend: str, config: BenchConfig) -> dict:
    path = config.workdir / f"{backend}-backlog"
    path.mkdir(parents=True)
    keys = [str(i) for i in range(config.n)]
    producer = open_queue(backend, path, config.batch)
    start = time.perf_counter()
    producer.put_all(keys)
    put_s = time.perf_counter() - start
    producer.close()
    consumer = open_queue(backend, path, config.batch)
    start = time.perf_counter()
    got = drain(consumer, "consumer")
    drain_s = time.perf_counter() - start
    consumer.close()
    return {"put_ops_s": config.n / put_s, "lease_ack_ops_s": config.n / drain_s, **check(keys, got)}


def produce_process(backend: str, path: Path, batch: int, keys: list[str], ready, go, done) -> None:
    queue = open_queue(backend, path, batch)
    ready.release()
    go.wait()
    queue.put_all(keys)
    done.set()
    queue.close()


def consume_process(backend: str, path: Path, batch: int, owner: str, out: Path, ready, go, done) -> None:
    queue = open_queue(backend, path, batch)
    ready.release()
    go.wait()
    got = drain(queue, owner, producer_done=done)
    finished = time.time()  # wall clock: comparable across processes
    queue.close()
    out.write_text(json.dumps({"keys": got, "finished": finished}))


def run_concurrent(backend: str, config: BenchConfig, repeat: int) -> dict:
    """One producer and two consumer processes; timed from a common start signal to the last ack."""
    ctx = multiprocessing.get_context("spawn")
    path = config.workdir / f"{backend}-conc{repeat}"
    path.mkdir(parents=True)
    open_queue(backend, path, config.batch).close()  # create the schema before anyone races for it
    keys = [str(i) for i in range(config.n)]
    ready, go, done = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    outs = [path / f"consumer{i}.json" for i in range(2)]
    procs = [ctx.Process(target=produce_process, args=(backend, path, config.batch, keys, ready, go, done))]
    procs += [
        ctx.Process(target=consume_process, args=(backend, path, config.batch, f"c{i}", out, ready, go, done))
        for i, out in enumerate(outs)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()  # every process has opened its queue: startup is not timed
    start = time.time()
    go.set()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{backend}: a benchmark process exited with {p.exitcode}")
    results = [json.loads(out.read_text()) for out in outs]
    elapsed = max(r["finished"] for r in results) - start
    got = [key for r in results for key in r["keys"]]
    return {"ops_s": config.n / elapsed, "per_consumer": [len(r["keys"]) for r in results], **check(keys, got)}


def run_concurrent_repeated(backend: str, config: BenchConfig) -> dict:
    """(b) swings between runs (litequeue is fast while its consumers keep up with its producer and slows
    once a backlog forms, since each pop sorts the backlog), so it is repeated and the median reported."""
    runs = [run_concurrent(backend, config, r) for r in range(config.repeats)]
    return {
        "ops_s": statistics.median(r["ops_s"] for r in runs),
        "runs_ops_s": [round(r["ops_s"]) for r in runs],
        "duplicates": sum(r["duplicates"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "per_consumer": [r["per_consumer"] for r in runs],
    }


def summary(config: BenchConfig, backlog: dict, conc: dict) -> dict:
    ratio_backlog = backlog["dataflow"]["lease_ack_ops_s"] / backlog["litequeue"]["lease_ack_ops_s"]
    ratio_conc = conc["dataflow"]["ops_s"] / conc["litequeue"]["ops_s"]
    duplicates = backlog["dataflow"]["duplicates"] + conc["dataflow"]["duplicates"]
    lost = backlog["dataflow"]["lost"] + conc["dataflow"]["lost"]
    return {
        "n": config.n,
        "dataflow_batch": config.batch,
        "backlog_ops_s": {b: round(r["lease_ack_ops_s"]) for b, r in backlog.items()},
        "backlog_put_ops_s": {b: round(r["put_ops_s"]) for b, r in backlog.items()},
        "conc_ops_s": {b: round(r["ops_s"]) for b, r in conc.items()},
        "conc_runs_ops_s": {b: r["runs_ops_s"] for b, r in conc.items()},
        "duplicates": duplicates,
        "lost": lost,
        "ratio_vs_litequeue_backlog": round(ratio_backlog, 1),
        "ratio_vs_litequeue_conc": round(ratio_conc, 1),
        "per_backend_checks": {
            b: {
                "backlog": {k: backlog[b][k] for k in ("duplicates", "lost")},
                "conc": {k: conc[b][k] for k in ("duplicates", "lost", "per_consumer")},
            }
            for b in backlog
        },
        "targets_met": ratio_backlog >= TARGET_BACKLOG_RATIO and ratio_conc >= TARGET_CONC_RATIO
        and duplicates == 0 and lost == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs of (b) per backend; the median counts")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a fresh temp folder, removed)")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma-separated subset; must include dataflow and litequeue"
    )
    args = parser.parse_args(argv)
    workdir = args.dir or Path(tempfile.gettempdir()) / f"bench-queue-{os.getpid()}"  # created by the runs
    try:
        config = BenchConfig(
            n=args.n,
            batch=args.batch,
            workdir=workdir,
            backends=tuple(b for b in args.backends.split(",") if b),
            repeats=args.repeats,
        )
    except ValueError as e:
        parser.error(str(e))
    backlog, conc = {}, {}
    try:
        for backend in config.backends:
            backlog[backend] = run_backlog(backend, config)
            conc[backend] = run_concurrent_repeated(backend, config)
            print(f"{backend}: backlog {backlog[backend]}, concurrent {conc[backend]}", file=sys.stderr, flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summary(config, backlog, conc)
    print(json.dumps({**result, "config": {**asdict(config), "workdir": str(workdir)}}))  # the last line: the result
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
