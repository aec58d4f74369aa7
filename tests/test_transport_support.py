"""Sample helpers and worker processes for the transport tests (no tests here; the run_db fixture is in conftest)."""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import torch

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta

H = 8  # tiny hidden size: a sample of T tokens is T * (8 + 1 + 3*8*4 + 8*4) bytes in fp32


def sample(key: str, tokens: int = 16, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """EAGLE3-shaped features whose values are a function of the key, so a reader can verify them."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return {
        "input_ids": torch.randint(0, 1000, (tokens,), generator=g),
        "loss_mask": torch.rand(tokens, generator=g) > 0.5,
        "aux_hidden": torch.randn(tokens, 3 * H, generator=g).to(dtype),
        "target_hidden": torch.randn(tokens, H, generator=g).to(dtype),
    }


def matches(key: str, tensors: dict[str, torch.Tensor], tokens: int = 16, dtype: torch.dtype = torch.float32) -> bool:
    expected = sample(key, tokens, dtype)
    return set(expected) == set(tensors) and all(torch.equal(expected[k], tensors[k]) for k in expected)


def tokens_for(key: str) -> int:
    """Varied sample lengths, so frees come out of order in size as well as in time."""
    return 4 + zlib.crc32(key.encode()) % 29


def produce(db: Path, producer_id: str, keys: list[str], capacity: int, hang: bool = False) -> None:
    """A producer process: write and commit each key's sample; then die without closing (or hang to be
    killed). Module-level so multiprocessing's spawn can find it."""
    import os
    import time

    from dataflow.control.queue import RefItem, RefQueue
    from dataflow.transport import open_writer

    conn = connect(db)
    writer = open_writer(conn, store="shm", producer_id=producer_id, max_inflight_bytes=capacity)
    queue = RefQueue(conn)
    waiting = functools.partial(RunMeta(conn).set, f"waiting.{producer_id}")  # tests can see backpressure
    for key in keys:
        handle, nbytes = writer.write(key, sample(key, tokens_for(key)), on_wait=waiting)
        queue.put(RefItem(key, handle, nbytes, handle["store"]))
    while hang:
        time.sleep(0.1)
    os._exit(0)  # like a crash: no close, no cleanup


def consume(db: Path, total: int, batch: int = 3, seed: int = 0, hold: bool = False) -> None:
    """A consumer process: lease a few refs, verify each sample, ack them in shuffled order, until `total`
    were acked; exit code 3 on any mismatch. hold=True: lease and map one batch, then hang (to be killed)."""
    import random
    import sys
    import time

    from dataflow.control.queue import RefQueue
    from dataflow.transport import open_reader

    conn, rng = connect(db), random.Random(seed)
    queue, reader = RefQueue(conn), open_reader(conn)
    done = 0
    while done < total:
        leases = queue.lease(f"consumer-{seed}", n=batch, ttl=1.0 if hold else 60.0)
        views = [reader.open(lease.handle) for lease in leases]
        if not all(matches(lease.key, v, tokens_for(lease.key)) for lease, v in zip(leases, views)):
            sys.exit(3)
        while hold and leases:
            time.sleep(0.1)
        for lease in leases:
            reader.check(lease.handle)
        rng.shuffle(leases)
        for lease in leases:
            assert not queue.ack([lease.token])
            done += 1
        if not leases:
            time.sleep(0.01)
    reader.close()  # returns normally: a consumer that merely attached must not unlink the arena


def spawn(target, *args, **kwargs):
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=target, args=args, kwargs=kwargs, daemon=True)
    process.start()
    return process


def abandon_run(conn) -> None:
    """End a test's run for good: its unconsumed samples are given up (LOST), then its arenas go. (A sweep
    alone keeps every arena a PENDING or LEASED ref points into, whatever the run's marks say.)"""
    from dataflow.control.queue import RefQueue
    from dataflow.transport import sweep, usage

    queue = RefQueue(conn)
    for store in usage(conn):
        queue.lose_store(store["store"], "the test is over")
    sweep(conn)
