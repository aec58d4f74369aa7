"""The rollout loop: lease prompt tasks -> (regenerate) -> tokenise -> forward -> write features -> commit.

`TaskQueue.complete` puts a task's ref and closes the task in one transaction, so a rollout killed at any
instant has either published a sample (never produced again) or will produce it after its lease expires.
The writer blocks on the byte watermark when the trainer lags; while it waits we keep our leases alive,
heartbeat "waiting for trainer", and stop cleanly if the run has finished for good. Every long phase (the
vocab pass, regeneration, each forward) runs inside `beating_during`, which heartbeats and extends the task
leases from a side thread; a lease found lost there (or by `set_payload`/`complete`) drops that task's work.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable

import torch

from dataflow.control import clock
from dataflow.control.beat import HEARTBEAT_EVERY_S, beating_during
from dataflow.control.db import database_path
from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefItem
from dataflow.control.tasks import TaskLease, TaskQueue
from dataflow.records import read_vocab
from dataflow.rollout.config import RolloutConfig
from dataflow.rollout.data import Conversation
from dataflow.rollout.engines.hf import HFEngine, token_budget_batches
from dataflow.rollout.prepare import prepare_run
from dataflow.rollout.regenerate import regenerate_replies
from dataflow.rollout.template import UNRENDERABLE, TokenizedSample, tokenize_sample
from dataflow.rollout.ui import RolloutView
from dataflow.rollout.vocab import covered

IDLE_SLEEP_S = 1.0
TASK_MAX_ATTEMPTS = 5  # a task whose processing raised this many times is dead (a crash or interrupt spends none)


class TrainerFinished(Exception):
    """The run finished for good (its drained stream was fully trained): no one will consume more features."""


class StopSignals:
    """While producing, SIGINT and SIGTERM only set a flag that `check` turns into KeyboardInterrupt at a
    safe point (never between a lease's commit and our record of it); a second signal interrupts at once.
    Installed only in the main thread (signal handlers live there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt

    def _record(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


@dataclass
class RolloutStats:
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # batch x longest, summed over forwards: the compute actually spent
    skipped_no_assistant: int = 0
    failed: int = 0  # samples the chat template refused (their tasks are dead, with the error)
    lost_leases: int = 0
    regenerated: int = 0
    trained_tokens: int = 0  # loss-masked tokens published
    trained_in_vocab: int = 0  # ... of which the draft vocabulary holds
    forward_s: float = 0.0
    regenerate_s: float = 0.0
    tokenize_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0
    sqlite_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.elapsed_s, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.elapsed_s, 1e-9)

    @property
    def vocab_coverage(self) -> float | None:
        """Share of the published trained tokens inside the draft vocabulary (the rest carry no loss)."""
        return self.trained_in_vocab / self.trained_tokens if self.trained_tokens else None

    @property
    def overhead_s(self) -> float:
        """The runtime's own time: tokenise, store write (not waiting), SQLite."""
        return self.tokenize_s + self.write_s + self.sqlite_s

    def summary(self) -> str:
        return (
            f"{self.samples} samples, {self.tokens} tokens in {self.elapsed_s:.1f}s "
            f"({self.samples_per_s:.2f} samples/s, {self.tokens_per_s:.0f} tokens/s); "
            f"forward {self.forward_s:.1f}s ({self.tokens / max(self.padded_tokens, 1):.0%} real tokens, "
            "the rest padding), "
            f"overhead {self.overhead_s:.2f}s ({self._overhead_share()}tokenise {self.tokenize_s:.2f}s, "
            f"store {self.write_s:.2f}s, sqlite {self.sqlite_s:.2f}s), waited for trainer {self.wait_s:.1f}s"
            + (f", regenerated {self.regenerated} in {self.regenerate_s:.1f}s" if self.regenerated else "")
            + (f", draft vocab covers {self.vocab_coverage:.1%} of trained tokens" if self.trained_tokens else "")
            + (f", skipped {self.skipped_no_assistant} without assistant tokens" if self.skipped_no_assistant else "")
            + (f", {self.failed} refused by the chat template (dead tasks)" if self.failed else "")
            + (f", dropped {self.lost_leases} whose task lease another rollout took over" if self.lost_leases else "")
        )

    def _overhead_share(self) -> str:
        """The overhead as a share of forward time, when a forward ran long enough to compare against."""
        return f"{100 * self.overhead_s / self.forward_s:.1f}% of forward: " if self.forward_s >= 1e-3 else ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("started")
        rates = {"elapsed_s": self.elapsed_s, "samples_per_s": self.samples_per_s, "tokens_per_s": self.tokens_per_s,
                 "vocab_coverage": self.vocab_coverage}
        return {**d, **rates}


class Producer:
    def __init__(self, conn, config: RolloutConfig, engine: HFEngine, writer, view: RolloutView, producer_id: str,
                 *, control: tuple | None = None):
        """control: (meta, tasks) to use instead of ones on conn (Ray mode: proxies of the ledger actor,
        which the forward's heartbeat thread may share)."""
        self.config, self.engine, self.writer, self.view = config, engine, writer, view
        if control is None:
            self.meta, self.tasks = RunMeta(conn), TaskQueue(conn, max_attempts=TASK_MAX_ATTEMPTS)
            self.beat_with = database_path(conn)
        else:
            self.meta, self.tasks = control
            self.beat_with = control
        self.producer_id = producer_id
        self.process_id = f"rollout-{producer_id}"
        self.lease_owner = f"{producer_id}@{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this incarnation (control/leases.py)
        self.stats = RolloutStats()
        self.vocab_ids = frozenset(read_vocab(self.meta).target_ids())
        self.held: dict[str, TaskLease] = {}  # token -> lease not yet completed
        self.status = "starting"
        self._last_heartbeat = 0.0
        self._last_extend = time.monotonic()
        self._said_trainer_dead = False
        self._waited = 0.0  # seconds the current write has waited on the watermark
        self.stop = StopSignals()

    def run(self) -> RolloutStats:
        """Produce until no task is left (then mark end-of-stream) or the trainer finished for good. A stop
        signal (SIGINT, SIGTERM) is honoured at the next safe point: leases handed back, KeyboardInterrupt."""
        counts = self.tasks.counts()
        self.view.start(total=sum(counts.values()), done=counts["done"])
        try:
            with self.stop:
                self.produce()
        except TrainerFinished:
            self.give_back("trainer finished")
            self.heartbeat("stopped: trainer finished", force=True)
            self.view.message("the trainer has finished for good (the run is finished); rollout stops")
        except BaseException:  # a stop signal or a crash: hand our tasks back now instead of at lease expiry
            self.give_back("rollout interrupted")
            self.heartbeat("interrupted", force=True)
            raise
        return self.stats

    def produce(self) -> None:
        while self.step():
            pass
        self.meta.set_end_of_stream()
        while self.config.wait_for_trainer and self.step_after_end():
            pass
        self.heartbeat("finished", force=True)

    def step_after_end(self) -> bool:
        """--wait-for-trainer: produce re-queued prompts until the trainer finishes (raises TrainerFinished)."""
        if self.tasks.remaining():
            while self.step():
                pass
            return True
        self.stop.check()
        if self.meta.run_finished():
            raise TrainerFinished
        self.heartbeat("stream complete; waiting for the trainer to finish")
        time.sleep(IDLE_SLEEP_S)
        return True

    def step(self) -> bool:
        """One lease group. False when every task of the run is done."""
        self.stop.check()
        if self.meta.run_finished():
            raise TrainerFinished
        n, ttl = self.config.tasks_per_lease, self.config.lease_ttl
        leases = self.timed("sqlite_s", self.tasks.lease, self.lease_owner, n, ttl)
        if not leases:
            if self.tasks.remaining() == 0:
                return False
            self.heartbeat("waiting for other rollouts' leased tasks")
            time.sleep(IDLE_SLEEP_S)
            return True
        self.held = {lease.token: lease for lease in leases}
        self._last_extend = time.monotonic()
        samples = {lease.token: Conversation.from_payload(lease.payload) for lease in leases}
        if self.config.regenerate:
            self.regenerate(samples)
        tokenized = self.timed("tokenize_s", self.tokenize, {t: s for t, s in samples.items() if t in self.held})
        for batch in token_budget_batches(tokenized, self.config.token_budget):
            self.stop.check()
            batch = [sample for sample in batch if sample.id in self.held]  # leases lost meanwhile: dropped
            if not batch:
                continue
            with self.beating("producing") as lost:
                features = self.timed("forward_s", self.engine.features, batch)
            self.drop(lost)
            self.stats.padded_tokens += len(batch) * len(batch[0].input_ids)
            for sample, tensors in zip(batch, features):
                if sample.id in self.held:
                    self.publish(sample.id, tensors)
            self.keep_leases()
        return True

    def tokenize(self, samples: dict[str, Conversation]) -> list[TokenizedSample]:
        """Tokenised samples keyed by lease token (in .id); samples without assistant tokens are closed."""
        out = []
        for token, sample in samples.items():
            try:
                tokenized = tokenize_sample(
                    self.engine.tokenizer,
                    sample,
                    max_length=self.config.max_length,
                    train_only_last_turn=self.config.train_only_last_turn,
                )
            except UNRENDERABLE as e:  # e.g. a template that insists on alternating roles: bury, go on
                self.stats.failed += 1
                self.tasks.fail(token, f"chat template: {e}", retryable=False)
                del self.held[token]
                continue
            if tokenized is None:
                self.stats.skipped_no_assistant += 1
                self.tasks.complete(token)
                del self.held[token]
            else:
                out.append(dataclasses.replace(tokenized, id=token))
        return out

    def publish(self, token: str, tensors: dict) -> None:
        """Write one sample's features, then commit its ref and close its task in one transaction."""
        lease = self.held[token]
        self.status = "producing"
        start, self._waited = time.monotonic(), 0.0
        try:
            handle, nbytes = self.writer.write(lease.key, tensors, on_wait=self.on_wait)
        finally:
            self.stats.wait_s += self._waited
            self.stats.write_s += time.monotonic() - start - self._waited
        ref = RefItem(lease.key, handle, nbytes, handle["store"])
        if not self.timed("sqlite_s", self.tasks.complete, token, [ref]):
            self.drop([token])  # our lease expired and another rollout took the task over
            self.writer.abandon(handle)
        else:
            self.stats.samples += 1
            self.stats.tokens += len(tensors["input_ids"])
            in_vocab, trained = covered(tensors["input_ids"].tolist(), tensors["loss_mask"].tolist(), self.vocab_ids)
            self.stats.trained_in_vocab += in_vocab
            self.stats.trained_tokens += trained
            self.held.pop(token, None)
        self.heartbeat(self.status)

    def on_wait(self, waited: float) -> None:
        """Called by the writer while the byte watermark is full."""
        self._waited = waited
        self.stop.check()
        if self.meta.run_finished():
            raise TrainerFinished
        trainers = self.meta.processes("train")
        if trainers and not any(p.alive() for p in trainers):
            stale = clock.now() - max(p.heartbeat_at for p in trainers)
            self.status = f"waiting for trainer (its heartbeat is {stale:.0f}s old: is it running?)"
            if not self._said_trainer_dead:
                self.view.message("the trainer looks dead (stale heartbeat); waiting for it: restart `dataflow train`")
                self._said_trainer_dead = True
        else:
            self._said_trainer_dead = False
            self.status = f"waiting for trainer ({waited:.0f}s)"
        self.keep_leases()
        self.heartbeat(self.status)

    def regenerate(self, samples: dict[str, Conversation]) -> None:
        """Replace the assistant replies with the target's own (kept in the task payload for restarts).
        A task whose lease was lost meanwhile is dropped: its new payload would land nowhere."""
        todo = [t for t in samples if not self.held[t].payload.get("regenerated") and samples[t].text is None]
        if not todo:
            return
        self.status = "regenerating replies"
        start = time.monotonic()
        with self.beating(self.status) as lost:
            new = regenerate_replies(
                self.engine, [samples[t] for t in todo], max_new_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature, seed=self.config.seed,
                greedy_first=self.config.greedy_first_reply,
            )
        self.stats.regenerate_s += time.monotonic() - start
        self.drop(lost)
        for token, sample in zip(todo, new):
            if token not in self.held:
                continue
            payload = {**self.held[token].payload, **sample.to_payload(), "regenerated": True}
            if not self.timed("sqlite_s", self.tasks.set_payload, token, payload):
                self.drop([token])
                continue
            samples[token] = sample
            self.stats.regenerated += 1

    def beating(self, status: str):
        """Heartbeat and keep every held lease alive during a long phase; yields the tokens found lost."""
        info = self.stats.as_dict()
        return beating_during(self.beat_with, TaskQueue, self.process_id, "rollout", status, info, list(self.held),
                              self.config.lease_ttl)

    def keep_leases(self) -> None:
        if self.held and time.monotonic() - self._last_extend > self.config.lease_ttl / 4:
            self.drop(self.timed("sqlite_s", self.tasks.extend, list(self.held), self.config.lease_ttl))
            self._last_extend = time.monotonic()

    def drop(self, tokens: Iterable[str]) -> None:
        """Tasks whose lease lapsed and went to another rollout: forget them (that rollout produces them)."""
        for token in tokens:
            if self.held.pop(token, None) is not None:
                self.stats.lost_leases += 1

    def give_back(self, reason: str) -> None:
        """Untried, not failed: stopping spends none of the tasks' attempts. By owner, not by `held`, so that
        a lease granted just before the stop landed goes back too."""
        self.tasks.release_owned(self.lease_owner, reason)
        self.held.clear()

    def heartbeat(self, status: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_heartbeat > HEARTBEAT_EVERY_S:
            self.timed("sqlite_s", self.meta.heartbeat, self.process_id, "rollout", status, self.stats.as_dict())
            self.view.update(self.tasks.counts()["done"], self.stats, status)
            self._last_heartbeat = now

    def timed(self, bucket: str, fn, *args):
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            setattr(self.stats, bucket, getattr(self.stats, bucket) + time.monotonic() - start)


def choose_producer_id(meta: RunMeta) -> str:
    """The lowest "r<i>" no running rollout of this run uses, so a rollout restarted after a crash gets
    the dead one's arena back (its unconsumed samples stay readable and the arena is not left behind)."""
    running = {p.id for p in meta.processes("rollout") if is_running(p)}
    i = 0
    while f"rollout-r{i}" in running:
        i += 1
    return f"r{i}"


def is_running(process) -> bool:
    """On this host the kernel knows (a fresh heartbeat can belong to a process killed seconds ago);
    elsewhere the heartbeat decides."""
    if process.host != socket.gethostname():
        return process.alive()
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def max_sample_bytes(config: RolloutConfig, engine: HFEngine) -> int:
    """Feature bytes of a sample of max_length tokens (ids, mask, aux 3H, target H), plus headers."""
    itemsize = torch.empty((), dtype=engine.config.torch_dtype).element_size()
    return config.max_length * (8 + 1 + 4 * engine.hidden_size * itemsize) + 4096


def run_rollout(conn, config: RolloutConfig, engine: HFEngine, view: RolloutView) -> RolloutStats:
    """Join the run (config, target, vocab, tasks), then produce until done; the writer is closed after."""
    from dataflow.transport import open_writer, sweep

    meta = RunMeta(conn)
    producer_id = config.producer_id or choose_producer_id(meta)
    process_id = f"rollout-{producer_id}"
    meta.heartbeat(process_id, "rollout", "starting")  # claims the id for later starters
    preparing = "preparing the run (dataset, vocab pass)"
    with beating_during(database_path(conn), TaskQueue, process_id, "rollout", preparing, {}):
        summary = prepare_run(conn, config, engine, view)
    if summary["bad_rows_skipped"]:
        view.message(f"skipped {summary['bad_rows_skipped']} bad dataset rows (--on-bad-row skip)")
    report = sweep(conn)  # arenas of dead producers that nobody needs any more
    for note in report.notes:
        view.message(note)
    writer = open_writer(
        conn, config.store, producer_id, config.max_inflight_bytes, config.store_dir,
        max_sample_bytes=max_sample_bytes(config, engine),
    )
    try:
        return Producer(conn, config, engine, writer, view, producer_id).run()
    finally:
        writer.close()
