"""The ledger actor: the run's SQLite file stays on one node, and the control-plane objects that speak to
it (RunMeta, RefQueue, TaskQueue) live in one Ray actor there. Every other process calls them through
`Remote` proxies, method by method, so each call is still one short `BEGIN IMMEDIATE` transaction of
the unchanged control plane (the same state machine and fencing), and a change of its API needs no
change here. The actor runs one call at a time on its one connection (a transaction never interleaves
with another), and the control calls on the hot path already take batches (put_many, lease n, ack and
extend lists).
"""

from __future__ import annotations

import os
import socket

import ray

from dataflow.control.db import connect
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue

CONTROL = {"meta": RunMeta, "refs": RefQueue, "tasks": TaskQueue}


def node_label() -> str:
    """Where the calling process runs, as `dataflow status` shows it: node IP and the Ray node id's head."""
    context = ray.get_runtime_context()
    return f"{ray.util.get_node_ip_address()} {context.get_node_id()[:8]}"


class Ledger:
    """Holds the run database's connection and its control objects (one per kind and options)."""

    def __init__(self, db_path: str, allow_network_fs: bool = False):
        self.conn = connect(db_path, allow_network_fs=allow_network_fs)
        self.db_path = db_path
        self._objects: dict[tuple, object] = {}
        self._stop = False

    def call(self, kind: str, options: dict, method: str, args: tuple, kwargs: dict):
        key = (kind, tuple(sorted(options.items())))
        if key not in self._objects:
            self._objects[key] = CONTROL[kind](self.conn, **options)
        return getattr(self._objects[key], method)(*args, **kwargs)

    def where(self) -> dict:
        return {"node": node_label(), "host": socket.gethostname(), "pid": os.getpid(), "db": self.db_path}

    def request_stop(self) -> None:
        """Ctrl-C of the driver: trainers stop at their next step (as on SIGTERM). Not persisted: a new
        driver starts a new ledger."""
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class Remote:
    """A control object (`kind` of CONTROL) inside the ledger actor, called like the local one."""

    conn = None  # no database on this node; code that would read it directly must not run in Ray mode

    def __init__(self, ledger, kind: str, **options):
        self._ledger, self._kind, self._options = ledger, kind, options

    def __getattr__(self, method: str):
        if method.startswith("_"):  # pickling probes dunders before __init__ has run
            raise AttributeError(method)

        def call(*args, **kwargs):
            return ray.get(self._ledger.call.remote(self._kind, self._options, method, args, kwargs))

        return call


class RemoteMeta(Remote):
    """RunMeta through the ledger; heartbeats carry the caller's pid, host and Ray node, not the ledger's."""

    def __init__(self, ledger):
        super().__init__(ledger, "meta")

    @property
    def run_id(self) -> str:
        return self.get("run_id")

    def heartbeat(self, process_id: str, role: str, status: str = "running", info: dict | None = None) -> None:
        info = {**(info or {}), "node": node_label()}
        ray.get(self._ledger.call.remote(
            "meta", {}, "heartbeat", (process_id, role, status, info), {"pid": os.getpid(), "host": socket.gethostname()}
        ))
