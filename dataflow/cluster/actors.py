"""The Ray actors of a cluster run: rollouts (the producer plus the Ray store serving its objects) and the
trainer ranks of one torch.distributed group. Both run the single-host loops unchanged, on ledger proxies.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

import ray

from dataflow.cluster.ledger import Remote, RemoteMeta
from dataflow.train.dist import all_sum
from dataflow.transport.owner import store_name
from dataflow.train.trainer import Trainer

STOP_POLL_S = 0.2  # a trainer may not train on for long after Ctrl-C: the rest of the stream can be seconds away


class RolloutActor:
    """Threaded (see the driver): `run` produces in the default group while the "serve" group hands the
    writer's objects to trainers, also during a long forward."""

    def __init__(self) -> None:
        self.writer = None
        self._run_thread: int | None = None

    def run(self, ledger, config, engine_name: str, engine_config, producer_id: str, name: str, namespace: str) -> str:
        from dataflow.rollout.engines import open_engine
        from dataflow.rollout.prepare import prepare_run
        from dataflow.rollout.producer import TASK_MAX_ATTEMPTS, Producer, max_sample_bytes
        from dataflow.rollout.ui import RolloutView
        from dataflow.transport.ray_store import RayWriter

        self._run_thread = threading.get_ident()
        meta, tasks, refs = RemoteMeta(ledger), Remote(ledger, "tasks", max_attempts=TASK_MAX_ATTEMPTS), Remote(ledger, "refs")
        engine = open_engine(engine_name, engine_config, max_model_len=config.max_request_tokens)
        with RolloutView(enabled=False) as view:
            prepare_run(None, config, engine, view, control=(meta, tasks))
            store = store_name("ray", meta.run_id, producer_id)
            # A rollout of this id that ran before took its objects with it: those refs are LOST, prompts re-queued.
            refs.lose_store(store, f"rollout {producer_id} restarted; its Ray objects died with it")
            meta.heartbeat(f"rollout-{producer_id}", "rollout", "starting")
            self.writer = RayWriter(refs, store=store, actor=name, namespace=namespace,
                                    max_inflight_bytes=config.max_inflight_bytes)
            self.writer.check_fits(max_sample_bytes(config, engine), "the largest sample (max length)")
            try:
                return Producer(None, config, engine, self.writer, view, producer_id, control=(meta, tasks)).run().summary()
            finally:
                self._run_thread = None  # the thread goes back to Ray's pool: no interrupt may reach it there
                self.writer.close()

    @ray.method(concurrency_group="serve")
    def object_of(self, key: str, gen: int) -> list:
        return [] if self.writer is None else self.writer.object_of(key, gen)

    @ray.method(concurrency_group="serve")
    def interrupt(self) -> None:
        """Ctrl-C for the producer: a KeyboardInterrupt in its thread, as a terminal's would be in a single-host
        rollout (it hands its task leases back and stops). Ray cannot cancel a running threaded-actor task."""
        if self._run_thread is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._run_thread), ctypes.py_object(KeyboardInterrupt))


class ClusterTrainer(Trainer):
    """The single-host trainer, with the stop request agreed on by every rank (a stop seen by one rank
    alone would leave the others waiting in a collective) and without the shm sweep (Ray objects die with
    their owner; nothing of a cluster run lies in this node's /dev/shm)."""

    @property
    def stop_requested(self) -> bool:
        return all_sum(self.dist, [float(self._stop_wanted)])[0] > 0

    @stop_requested.setter
    def stop_requested(self, wanted: bool) -> None:
        self._stop_wanted = wanted

    def _sweep(self) -> None:
        pass


class TrainerActor:
    """One rank. Runs in the actor's main thread, so the trainer's own SIGTERM handling works as on one host."""

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous: this node's IP and a free port."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, ledger, rank: int, world: int, master: tuple[str, int], config, options, threads: int | None) -> str:
        import torch

        from dataflow.train.dist import close_dist, init_dist
        from dataflow.ui import configure_logging

        configure_logging()  # the trainer's messages and step lines are log records; Ray keeps the actor's stderr
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",  # Ray shows each rank its own GPU
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        if threads:
            torch.set_num_threads(threads)
        dist = init_dist(options.device)
        done = threading.Event()
        try:
            control = (RemoteMeta(ledger), Remote(ledger, "refs"), Remote(ledger, "tasks"))
            trainer = ClusterTrainer(None, config, options, dist, control=control)
            threading.Thread(target=_forward_stop, args=(ledger, trainer, done), daemon=True).start()
            return trainer.run()
        finally:
            done.set()
            close_dist(dist)


def _forward_stop(ledger, trainer: Trainer, done: threading.Event) -> None:
    """The driver's Ctrl-C reaches a trainer as the ledger's stop flag, read here, set where SIGTERM sets it."""
    while not done.wait(STOP_POLL_S):
        if ray.get(ledger.stop_requested.remote()):
            trainer.stop_requested = True
            return
