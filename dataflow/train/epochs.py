"""`--epochs N` offline: replay the run's retained features (files store) N-1 more times.

Once the stream is drained, every epoch-0 ref is put again under its epoch key (dataflow/keys.py) with the
same handle, each epoch in its own seeded shuffle. Puts are idempotent by key, so a restarted trainer
adds nothing twice. Arena (shm) features are freed on ack and cannot be replayed: the rollout's own
`--epochs` regenerates them instead.
"""

from __future__ import annotations

import random
import sqlite3

from dataflow.control.queue import RefItem, RefQueue
from dataflow.errors import InputError
from dataflow.keys import EPOCH_MARK, epoch_key


def replay_epochs(conn: sqlite3.Connection, reader, *, epochs: int, seed: int) -> int:
    """Put epochs 1..epochs-1; returns how many refs were new (0: nothing left to replay)."""
    if epochs <= 1:
        return 0
    queue = RefQueue(conn)
    existing = queue.keys_containing(EPOCH_MARK)
    base = queue.consumed_items(without=EPOCH_MARK)  # the trained (or acked) first-epoch refs, in id order
    compacted = queue.compacted_keys(without=EPOCH_MARK)  # trained first-epoch refs whose rows went: features not kept
    wanted = {epoch_key(key, e) for key in [r.key for r in base] + compacted for e in range(1, epochs)} - existing
    if not wanted:  # all replayed already (or the rollout ran its own epochs)
        return 0
    gone = [r.key for r in base if not reader.retained(r.handle)] + compacted
    gone = [key for key in gone if epoch_key(key, epochs - 1) in wanted]
    if gone:
        raise InputError(
            f"--epochs {epochs}: features of {len(gone)} refs (e.g. {gone[0]!r}) were freed after training "
            "(arena store); use `dataflow rollout --store files` or the rollout's own --epochs"
        )
    items = []
    for epoch in range(1, epochs):
        order = list(base)
        random.Random(seed + epoch).shuffle(order)
        items += [RefItem(key=epoch_key(r.key, epoch), handle=r.handle, nbytes=r.nbytes, store=r.store)
                  for r in order if epoch_key(r.key, epoch) in wanted]
    return sum(queue.put_many(items))
