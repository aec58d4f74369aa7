"""The Ray-object feature store of multi-node mode: each sample is one Ray object owned by the rollout
actor that wrote it; the handle names that actor, which hands the object to a trainer on any node.

    writer = RayWriter(refs, store=..., actor=..., namespace=..., max_inflight_bytes=...)
    handle, nbytes = writer.write(key, tensors, on_wait)   # one uint8 buffer in the arena's layout, ray.put
    writer.object_of(key, gen)                            # served by the rollout actor: [ObjectRef] or []
    RayReader().open(handle)                              # zero-copy views (same node: the plasma store)

A Ray object lives as long as its owner: when a rollout's process or node dies, its samples are gone, the
reader raises FeaturesLost, the ref becomes LOST and its prompt is regenerated (the existing path). The
writer lets go of an object once its ref is no longer PENDING/LEASED in the ledger (acked, lost or
superseded), re-read from the ledger only when the byte watermark is reached, as the shm arena does.
"""

from __future__ import annotations

import secrets
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import ray
import torch
from ray.exceptions import RayError

from dataflow.errors import FeaturesLost
from dataflow.transport.arena import TensorSpec, plan_layout, views_of, wait_for
from dataflow.transport.files import FilesWriter

FETCH_TIMEOUT_S = 120.0  # a fetch that long means the owner is unreachable: treat the features as lost


@dataclass(frozen=True)
class Stored:
    key: str
    obj: ray.ObjectRef
    nbytes: int


class RayWriter:
    """The rollout actor's side. Each write is committed (or abandoned) by the producer before its next
    write, so whenever the writer looks at the ledger, every object it holds is either live there or free."""

    kind = "ray"

    def __init__(self, refs, *, store: str, actor: str, namespace: str, max_inflight_bytes: int):
        self.refs = refs  # RefQueue or the ledger's proxy of it: live_handles(store)
        self.store, self.actor, self.namespace = store, actor, namespace
        self.capacity = max_inflight_bytes
        self._objects: dict[int, Stored] = {}  # gen -> object; read by object_of from the serving thread
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._objects.values())

    check_fits = FilesWriter.check_fits  # the same byte watermark as the files store, with its message

    def write(
        self, key: str, tensors: dict[str, torch.Tensor], on_wait: Callable[[float], None] | None = None
    ) -> tuple[dict, int]:
        specs, length = plan_layout(tensors)
        self.check_fits(length, f"sample {key!r}")
        if self.used_bytes + length > self.capacity:
            wait_for(lambda: True if self._drop_unneeded() + length <= self.capacity else None, on_wait)
        buf = torch.empty(length, dtype=torch.uint8).numpy()
        for name, dst in views_of(memoryview(buf), 0, specs).items():
            dst.copy_(tensors[name])
        gen = secrets.randbits(62)
        with self._lock:
            self._objects[gen] = Stored(key, ray.put(buf), length)  # numpy: stored out-of-band, read zero-copy
        handle = {
            "kind": self.kind,
            "store": self.store,
            "key": key,
            "gen": gen,
            "actor": self.actor,
            "namespace": self.namespace,
            "nbytes": length,
            "tensors": [s.to_json() for s in specs],
        }
        return handle, length

    def object_of(self, key: str, gen: int) -> list[ray.ObjectRef]:
        """The object behind a handle, in a list so Ray passes the reference instead of the bytes."""
        with self._lock:
            stored = self._objects.get(gen)
        return [stored.obj] if stored is not None and stored.key == key else []

    def abandon(self, handle: dict) -> None:
        with self._lock:
            self._objects.pop(handle["gen"], None)

    def close(self) -> None:
        with self._lock:
            self._objects.clear()

    def _drop_unneeded(self) -> int:
        """Let go of every object whose ref the ledger no longer holds live; returns the bytes still held."""
        live = {h["gen"] for h in self.refs.live_handles(self.store)}
        with self._lock:
            self._objects = {gen: s for gen, s in self._objects.items() if gen in live}
            return sum(s.nbytes for s in self._objects.values())


class RayReader:
    """The trainer's side: asks the owning rollout actor for the object, then maps it."""

    def __init__(self) -> None:
        self._actors: dict[tuple[str, str], ray.actor.ActorHandle] = {}

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        key = handle["key"]
        try:
            found = ray.get(self._actor(handle).object_of.remote(key, handle["gen"]), timeout=FETCH_TIMEOUT_S)
            buf = ray.get(found[0], timeout=FETCH_TIMEOUT_S) if found else None
        except (RayError, ValueError) as e:  # ValueError: no actor of that name (it died or never restarted)
            self._actors.pop((handle["namespace"], handle["actor"]), None)
            raise FeaturesLost(
                f"sample {key!r}: rollout {handle['actor']} holding its features is gone "
                f"({type(e).__name__}); the prompt must be regenerated"
            ) from None
        if buf is None:
            raise FeaturesLost(f"sample {key!r}: rollout {handle['actor']} no longer holds it (restarted since)")
        with warnings.catch_warnings():  # the object store's memory is read-only; collate copies it out
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return views_of(memoryview(buf), 0, [TensorSpec.from_json(t) for t in handle["tensors"]])

    def _actor(self, handle: dict):
        name = (handle["namespace"], handle["actor"])
        if name not in self._actors:
            self._actors[name] = ray.get_actor(handle["actor"], namespace=handle["namespace"])
        return self._actors[name]
