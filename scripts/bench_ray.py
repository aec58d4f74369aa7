"""Ray mode's two hot paths against their single-host counterparts, in the same run. Prints one JSON object last.

    .venv/bin/python scripts/bench_ray.py [--refs 4096] [--batch 64] [--iters 8]

- Ledger: put + lease + ack of --refs refs in batches of --batch, through the ledger actor (`Remote`
  proxies, one Ray call per control call) vs on the SQLite file directly. Target: >= 1,000 refs/s through
  the actor. `actor_refs_per_s_unbatched` is the same with one ref per call (the round trip dominates).
- Features: one 48 MiB sample (EAGLE3 features of 3072 tokens, H = 2048, bf16) written by a producer actor,
  then opened and read in full by this process: the Ray-object store vs the shm arena, on one node.
  Each `*_fetch_ms` is the consumer's time from the handle to having touched every byte (median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transport import SIZES, make_sample, touch  # noqa: E402

from dataflow.cluster.ledger import Ledger, Remote  # noqa: E402
from dataflow.control.db import connect  # noqa: E402
from dataflow.control.meta import RunMeta  # noqa: E402
from dataflow.control.queue import RefItem, RefQueue  # noqa: E402
from dataflow.transport import open_reader  # noqa: E402

NAMESPACE = "dataflow-bench"
PRODUCER = "bench-ray-producer"
TARGET_ACTOR_REFS_PER_S = 1000


def refs_per_s(refs, n: int, batch: int, prefix: str) -> float:
    """put_many + lease(n) + ack, batch by batch, as a rollout and a trainer would drive the queue."""
    start = time.perf_counter()
    for first in range(0, n, batch):
        items = [RefItem(f"{prefix}-{i}", {"kind": "ray", "gen": i}, 1, "bench") for i in range(first, first + batch)]
        refs.put_many(items)
        leases = refs.lease("bench", n=batch, ttl=60.0)
        refs.ack([lease.token for lease in leases])
    return n / (time.perf_counter() - start)


def bench_ledger(workdir: Path, n: int, batch: int) -> dict:
    direct = refs_per_s(RefQueue(connect(workdir / "direct.sqlite")), n, batch, "direct")
    ledger = ray.remote(Ledger).options(num_cpus=0).remote(str(workdir / "actor.sqlite"))
    remote = Remote(ledger, "refs")
    refs_per_s(remote, batch, batch, "warmup")  # the actor's first call opens the database
    through_actor = refs_per_s(remote, n, batch, "actor")
    unbatched = refs_per_s(remote, min(n, 512), 1, "single")
    ray.kill(ledger)
    return {
        "actor_refs_per_s": round(through_actor),
        "direct_refs_per_s": round(direct),
        "actor_refs_per_s_unbatched": round(unbatched),
        "direct_ms_per_ref": round(1000 / direct, 4),  # the ledger's own time per ref: the same SQLite work
    }


class SampleProducer:
    """Holds one sample and writes it into either store on request (the rollout's side of a hand-off)."""

    def __init__(self, sample: dict[str, torch.Tensor], db: str, capacity: int):
        from dataflow.transport.ray_store import RayWriter
        from dataflow.transport.shm import ShmWriter, arena_name

        self.sample = {name: t.clone() for name, t in sample.items()}  # own memory, not the object store's
        conn = connect(db)
        self.writers = {
            "ray": RayWriter(RefQueue(conn), store="bench", actor=PRODUCER, namespace=NAMESPACE,
                             max_inflight_bytes=capacity),
            "shm": ShmWriter(conn, name=arena_name(RunMeta(conn).run_id, "bench-ray"), capacity=capacity),
        }

    def write(self, kind: str, key: str) -> dict:
        return self.writers[kind].write(key, self.sample)[0]

    def free(self, kind: str, handle: dict) -> None:
        self.writers[kind].abandon(handle)

    def object_of(self, key: str, gen: int) -> list:
        return self.writers["ray"].object_of(key, gen)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def bench_fetch(workdir: Path, iters: int) -> dict:
    tokens, hidden, dtype = SIZES["48MiB_bf16"]
    producer = ray.remote(SampleProducer).options(name=PRODUCER, namespace=NAMESPACE, num_cpus=0).remote(
        make_sample(tokens, hidden, dtype), str(workdir / "features.sqlite"), 128 << 20)
    reader = open_reader(None)
    result = {}
    try:
        for kind in ("ray", "shm"):
            times = []
            for i in range(iters + 1):  # the first is a warm-up (maps the arena, starts the object transfer path)
                handle = ray.get(producer.write.remote(kind, f"{kind}-{i}"))
                start = time.perf_counter()
                touch(reader.open(handle))
                elapsed = time.perf_counter() - start
                ray.get(producer.free.remote(kind, handle))
                if i:
                    times.append(elapsed)
            result[f"{kind}_fetch_ms_48MiB"] = round(1000 * statistics.median(times), 2)
    finally:
        reader.close()
        ray.get(producer.close.remote())
        ray.kill(producer)
    result["ray_over_shm"] = round(result["ray_fetch_ms_48MiB"] / result["shm_fetch_ms_48MiB"], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.refs < args.batch or args.batch < 1 or args.iters < 1:
        parser.error("--refs must be >= --batch >= 1 and --iters >= 1")
    torch.set_num_threads(args.threads)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            result = {**bench_ledger(Path(tmp), args.refs, args.batch), **bench_fetch(Path(tmp), args.iters)}
    finally:
        ray.shutdown()
    result["targets_met"] = result["actor_refs_per_s"] >= TARGET_ACTOR_REFS_PER_S
    print(json.dumps({**result, "config": vars(args)}))  # the last line: the result
    return 0 if result["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
