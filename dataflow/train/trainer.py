"""The training loop: lease -> map -> step -> ack -> checkpoint (docs/architecture.md, "A ref's life").

Exactly-once: a ref is acked only after the optimiser step that used it, and counts as trained only when
the checkpoint holding that step is recorded in the run database. On start, refs acked after the last
recorded checkpoint go back to the queue (or their prompts are re-queued when the bytes are gone), the
draft resumes from that checkpoint, and refs are leased in id order again, so the result equals a run
that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dataflow.control import clock
from dataflow.control.beat import HEARTBEAT_EVERY_S, beating_during
from dataflow.control.db import database_path
from dataflow.control.meta import STALE_AFTER_S, RunMeta
from dataflow.control.queue import RefQueue
from dataflow.control.tasks import TaskQueue
from dataflow.options import torch_dtype
from dataflow.train import checkpoint as ckpt
from dataflow.train.build import build_draft, check_draft_matches, check_out_dir, schedule_total, wait_for_records
from dataflow.train.config import TrainConfig, TrainOptions
from dataflow.train.dist import Dist, all_sum, all_true, barrier, gather_ints, sum_gradients
from dataflow.train.epochs import replay_epochs
from dataflow.train.lock import hold_trainer_lock, refuse_unless_all_locked
from dataflow.train.loss import loss_tokens
from dataflow.train.metrics import MetricsLog, StatusLine, Window, describe, expected_acceptance
from dataflow.train.source import LeasedSample, MicroBatch, RefSource, check_features, collate
from dataflow.train.step import TrainStep, keep_freed_memory
from dataflow.train.validation import ValidationSet
from dataflow.transport.gc import compact_trained

IDLE_SLEEP_S = (0.05, 1.0)  # back-off bounds while the queue is empty


@dataclass
class Progress:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    held_out: int = 0  # samples acked without training (--validation-share); the schedule counts them
    uncovered: list[int] = field(default_factory=list)  # ref ids acked since the last recorded checkpoint


class Trainer:
    def __init__(self, conn: sqlite3.Connection | None, config: TrainConfig, options: TrainOptions, dist: Dist,
                 *, control: tuple | None = None):
        """control: (meta, queue, tasks) to use instead of ones on conn (Ray mode: ledger actor proxies)."""
        self.config, self.options, self.dist = config, options, dist
        self.meta, self.queue, self.tasks = control or (RunMeta(conn), RefQueue(conn), TaskQueue(conn))
        self.beat_with = (self.meta, self.queue) if control else database_path(conn)  # for beating_during
        self.process_id = f"train-{dist.rank}"
        # Leases are owned by this incarnation: a restart is another owner (see control/leases.py).
        self.lease_owner = f"{self.process_id}@{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.out = check_out_dir(options.out)
        self.status = StatusLine(live=options.progress, speak=dist.is_main)
        self.stop_requested = False
        self._last_heartbeat, self._last_row, self._last_validation = 0.0, {}, {}
        self.progress, self.metrics = Progress(), None
        try:
            self._build()
        except BaseException:
            self.status.close()  # leave the terminal clean on a config error
            raise

    def _build(self) -> None:
        from dataflow.transport import open_reader

        config, options, dist = self.config, self.options, self.dist
        self.meta.record_or_check_config("train", config.recorded())
        self.reader = open_reader(self.queue.conn)
        self.source = RefSource(self.queue, self.reader, owner=self.lease_owner,
                                partition=(dist.rank, dist.world), lease_ttl=options.lease_ttl)
        target, vocab = wait_for_records(self.meta, self._waiting, options.wait_for_rollout)
        with self._beating("building the draft"):
            model, head = build_draft(target, vocab, config)  # reads the target's head: a big one takes a while
            if dist.device.type == "cpu":
                keep_freed_memory()
            self.step = TrainStep(model, head.lm_head, config, device=dist.device, compile=options.compile)
        self.model = self.step.master  # fp32: checkpointed and exported
        # The target's dtype: features are collated in it and the export is written in it.
        self.target_dtype = torch_dtype(target.dtype)
        self.aux_layers = list(target.aux_layers)  # exported, so that servers capture the layers it was trained on
        self.validation = ValidationSet(config.validation_share, options.validation_tokens)
        self._validated = (-1, 0)  # (step, held-out samples) of the last measurement

    # ---- start: put back what the last run left, resume from the last durable checkpoint ----

    def resume(self) -> None:
        # We hold this rank's lock, so every earlier incarnation of this rank is dead: its leases come back now.
        self.queue.release_owners(f"{self.process_id}@", self.lease_owner, f"trainer {self.process_id} restarted")
        self._wait_for_other_leases()
        if self.dist.is_main:
            ckpt.check_out_dir_run(self.out, self.meta.run_id)
            partial = ckpt.remove_partial_writes(self.out)
            if partial:
                self.status.print(f"removed {len(partial)} checkpoint writes a kill interrupted ({partial[0]}, ...)")
            self._sweep()  # arenas of dead producers that no live ref needs
            self._put_back_acked()
        barrier(self.dist)
        last = self.meta.last_checkpoint()
        if last is not None:
            state = ckpt.read_training_state(last.path, run_id=self.meta.run_id)
            check_draft_matches(state, self.model, last.path)
            self.step.load_state_dict(state["model"], state)
            torch.set_rng_state(state["rng"])
            self.progress = Progress(step=state["step"], samples=state["samples"], tokens=state["tokens"],
                                     held_out=state.get("held_out", 0))
            self.status.print(f"resumed from {last.path} (step {last.step})")
        self.metrics = MetricsLog(self.out, resume_step=self.progress.step, report_to=self.options.report_to,
                                  run_id=self.meta.run_id) if self.dist.is_main else None

    def _put_back_acked(self) -> None:
        """Refs acked after the last recorded checkpoint never counted: back to the queue, or LOST (their
        prompts re-queued) when their features are gone."""
        acked = self.queue.acked()
        kept = [a.id for a in acked if self.reader.retained(a.handle)]
        requeued, lost = self.queue.put_back(kept, sorted({a.id for a in acked} - set(kept)))
        if requeued or lost:
            self.status.print(f"put back {requeued} refs acked after the last checkpoint; {lost} prompts re-queued")

    def _wait_for_other_leases(self) -> None:
        """Leases another owner still holds (a rank of an earlier, larger group; an older version's trainer) come
        back once they expire: wait for that, so refs are leased in the same order as before a crash. Bounded
        on the monotonic clock (a consumer we do not know of may hold some legitimately, and a wall clock that
        jumped back would stretch the deadlines); SIGTERM ends the wait."""
        give_up = time.monotonic() + 3 * self.options.lease_ttl + 10 * HEARTBEAT_EVERY_S
        while not self.stop_requested and time.monotonic() < give_up:
            self.queue.reclaim()
            deadlines = self.queue.lease_deadlines()
            if not deadlines:
                return
            owner, deadline = max(deadlines.items(), key=lambda kv: kv[1])
            self._waiting(f"waiting for leases of {', '.join(sorted(deadlines))} to expire (the last, of {owner}, "
                          f"in {deadline - clock.now():.0f}s by the wall clock; at most "
                          f"{give_up - time.monotonic():.0f}s more)", 0.0)
            time.sleep(min(self.options.lease_ttl / 4, 1.0))

    # ---- the loop ----

    def run(self) -> str:
        """Train until the stream is drained; returns how it ended: finished, max-steps, idle or SIGTERM."""
        signal.signal(signal.SIGTERM, self._request_stop)
        try:
            self.resume()
            ending = self._loop()
            self._finish(ending)
            return ending
        except BaseException as e:
            self._heartbeat(f"stopped ({type(e).__name__})", force=True)  # a restart need not wait out our leases
            raise
        finally:
            self.source.give_back(f"trainer {self.process_id} stopped")
            if self.metrics is not None:
                self.metrics.close()
            self.status.close()
            self.reader.close()

    def _loop(self) -> str:
        window, idle_since, sleep = Window(), None, IDLE_SLEEP_S[0]
        while True:
            if self.options.max_steps and self.progress.step >= self.options.max_steps:
                return "max-steps"
            if self.stop_requested:
                return "SIGTERM"
            wait_start = time.monotonic()
            micro = self.source.step_batch(grad_accum=self.config.grad_accum, batch_tokens=self.config.batch_tokens,
                                           fill_wait_s=self.options.fill_wait, stream_open=self._stream_open)
            window.data_wait_s += time.monotonic() - wait_start
            if not all_true(self.dist, not micro):  # some rank has data: everyone steps
                self._train_step(micro, window)
                idle_since, sleep = None, IDLE_SLEEP_S[0]
                window = self._log(window)
                continue
            if all_true(self.dist, self._drained()):
                if not self._replay_epochs():
                    return "finished"
                continue
            idle_since = idle_since or time.monotonic()
            if self._idle_too_long(time.monotonic() - idle_since):
                return "idle"
            self._waiting(self._wait_reason(), time.monotonic() - idle_since)
            time.sleep(sleep)
            window.data_wait_s += sleep
            sleep = min(sleep * 2, IDLE_SLEEP_S[1])

    def _train_step(self, micro: list[list[LeasedSample]], window: Window) -> None:
        held = self._hold_out(micro)
        if held:
            self.progress.uncovered += self.source.ack(held)
        # A step can outlast the heartbeat's staleness and --lease-ttl (the first one compiles): a side thread
        # keeps both fresh until the ack, so the trainer neither looks dead nor trains a lapsed ref twice.
        with self._beating("training"):
            batches = [b for b in (self._collate(mb) for mb in micro if mb) if b is not None]
            samples = [s for mb in micro for s in mb]  # after _collate dropped any lost ones
            local_tokens = sum(int(loss_tokens(b.loss_mask)) for b in batches)
            n_samples, n_tokens, n_held = all_sum(self.dist, [len(samples), local_tokens, len(held)])
            self.progress.held_out += int(n_held)
            if n_samples == 0:  # every sample was lost or held out: no update (AdamW would still move on momentum)
                return
            sums = self._accumulate(batches, max(n_tokens, 1.0))
            sum_gradients(self.dist, self.step.params)
            if self.progress.step == 0:  # fixed once; a resumed run reads it from the checkpoint
                total = schedule_total(self.meta, self.tasks, self.queue, self.options)
                self.step.schedule.total, self.step.schedule.unit = total
            self.step.update(step=self.progress.step, samples=self.progress.samples + self.progress.held_out)
        acked = self.source.ack(samples)
        if len(acked) < len(samples):  # stalled past --lease-ttl (stopped, database locked): may train twice
            self.status.print(f"warning: {len(samples) - len(acked)} leases lapsed before the ack; raise --lease-ttl")
        totals = all_sum(self.dist, [len(samples), sum(s.length for s in samples)] + sums)
        k = self.config.ttt_length
        self.progress.step += 1
        self.progress.samples += int(totals[0])
        self.progress.tokens += int(totals[1])
        self.progress.uncovered += acked
        window.add(loss=totals[2] / max(n_tokens, 1.0), loss_sum=totals[3 : 3 + k], correct=totals[3 + k : 3 + 2 * k],
                   count=totals[3 + 2 * k :], samples=int(totals[0]), tokens=int(totals[1]))
        if self.validation.share and self.progress.step % self.options.validate_every == 0:
            self._validate()
        if self.progress.step % self.options.save_every == 0:
            self._checkpoint()
        self.source.keep_alive()
        self._heartbeat("training")

    def _hold_out(self, micro: list[list[LeasedSample]]) -> list[LeasedSample]:
        """Take the held-out prompts' samples (--validation-share) out of the step: copied into the validation
        set where it has room, and returned to be acked untrained. Only a copy needs the store to confirm its
        bytes: a held-out sample already held (a later epoch) or past the set's budget is acked unchecked."""
        held = [s for mb in micro for s in mb if self.validation.wants(s)]
        if not held:
            return []
        tokens = {s.lease.token for s in held}
        for mb in micro:
            mb[:] = [s for s in mb if s.lease.token not in tokens]
        copies = self.validation.copies(held)
        confirmed = self.source.confirm(copies)  # after the copy: bytes reused under it (a lapsed lease) are dropped
        self.validation.add(confirmed)
        dropped = {c.lease.token for c in copies} - {c.lease.token for c in confirmed}
        return [s for s in held if s.lease.token not in dropped]

    def _validate(self) -> None:
        """The draft's per-step accuracies and τ̂ on the held-out samples (every rank's), as a metrics row."""
        k = self.config.ttt_length
        with self._beating("measuring held-out acceptance"):
            correct, count = self.validation.accuracy_sums(self.step, self.config.batch_tokens, k, self.dist.device)
        totals = all_sum(self.dist, correct + count + [len(self.validation.samples), self.validation.tokens])
        self._validated = (self.progress.step, len(self.validation.samples))
        if not totals[2 * k]:
            return
        accs = [c / max(n, 1.0) for c, n in zip(totals[:k], totals[k : 2 * k])]
        row = {"step": self.progress.step, **{f"val_acc_{i}": a for i, a in enumerate(accs)},
               "val_tau_hat": expected_acceptance(accs), "val_samples": int(totals[2 * k]),
               "val_tokens": int(totals[2 * k + 1])}
        self._last_validation = row
        if self.metrics is not None:
            self.metrics.write(row)
            self.status.step(f"step {row['step']}  held-out tau-hat {row['val_tau_hat']:.2f}  acc_0 "
                             f"{accs[0]:.3f}  on {row['val_samples']} samples")

    def _collate(self, samples: list[LeasedSample]) -> MicroBatch | None:
        """Copy a micro-batch out of the store; samples whose bytes changed under us are dropped (LOST)."""
        cfg = self.model.cfg
        for s in samples:
            check_features(s, aux_width=3 * cfg.target_hidden_size, hidden_width=self.step.head.weight.shape[1])
        batch = collate(samples, self.dist.device, self.target_dtype)
        kept = self.source.confirm(samples)
        if len(kept) < len(samples):
            samples[:] = kept
            return collate(kept, self.dist.device, self.target_dtype) if kept else None
        return batch

    def _accumulate(self, batches: list[MicroBatch], n_tokens: float) -> list[float]:
        """Forward/backward every micro-batch; returns [weighted loss sum, loss_sum_k.., correct_k.., count_k..]."""
        k = self.config.ttt_length
        totals = [0.0] * (1 + 3 * k)
        for b in batches:
            weighted, sums = self.step.accumulate(b, n_tokens)
            values = [weighted] + [v.detach() for v in sums.loss_sum] + sums.correct
            values = torch.stack([v.float() for v in values]).tolist() + sums.count  # one device sync
            for i, v in enumerate(values):
                totals[i] += v
        return totals

    # ---- checkpoints, ending ----

    def _checkpoint(self, unchanged: Path | None = None) -> Path | None:
        """Rank 0 writes; the refs every rank acked since the last one become TRAINED with it. `unchanged`:
        the last checkpoint, still the weights (only held-out refs were acked since): recorded again, not
        rewritten."""
        covered = gather_ints(self.dist, self.progress.uncovered)
        path = unchanged
        if self.dist.is_main and unchanged is not None:
            self.meta.record_checkpoint(self.progress.step, str(unchanged), covered)
        elif self.dist.is_main:
            state = {
                "model": {n: t for n, t in self.model.state_dict().items() if n != ckpt.EMBED_NAME},
                **self.step.state_dict(),
                "rng": torch.get_rng_state(),
                "draft_config": asdict(self.model.cfg),
                "train_config": self.config.recorded(),
                "refs": covered,
                "run_id": self.meta.run_id,
                **{name: getattr(self.progress, name) for name in ("step", "samples", "tokens", "held_out")},
            }
            path = ckpt.write_checkpoint(self.out, self.progress.step, self.model, state, dtype=self.target_dtype,
                                         include_embed=self.config.export_embed_tokens, aux_layers=self.aux_layers)
            self.meta.record_checkpoint(self.progress.step, str(path), covered)
            ckpt.publish(self.out, path, keep=self.options.keep)  # only now: a kill before the record prunes nothing
            compact_trained(self.queue, self.meta)  # rows of refs trained by older checkpoints become bare keys
        barrier(self.dist)
        self.progress.uncovered = []
        return path

    def _finish(self, ending: str) -> None:
        last = self.meta.last_checkpoint()
        path = Path(last.path) if last is not None and last.step == self.progress.step else None
        if path is None and self.progress.step > 0:
            path = self._checkpoint()
        elif path is not None and all_sum(self.dist, [len(self.progress.uncovered)])[0]:
            self._checkpoint(unchanged=path)  # held-out refs acked after the last step: not left ACKED
        finished = ending == "finished"  # the stream drained; --max-steps, SIGTERM and idle are pauses
        measured = (self.progress.step, len(self.validation.samples))
        if finished and self.validation.share and self._validated != measured:
            self._validate()  # the last step or the last held-out samples came after the last measurement
        if finished and self.dist.is_main:
            if path is not None:
                ckpt.mark_final(self.out, path)
            self.meta.set_run_finished()
            self._sweep()  # a finished run's arenas are freed (a producer still attached keeps its own)
        status = "finished" if finished else f"stopped ({ending})"
        self._heartbeat(status, force=True)
        p = self.progress
        then = "" if finished else "; the run is not finished: `dataflow train` again goes on from here"
        self.status.print(f"{status}: step {p.step}, {p.samples} samples; checkpoints in {self.out}{then}")

    def _replay_epochs(self) -> bool:
        """--epochs: once drained, rank 0 puts the later epochs' refs; whether any were new."""
        new = 0
        if self.dist.is_main:
            new = replay_epochs(self.queue.conn, self.reader, epochs=self.options.epochs, seed=self.config.seed)
        return all_sum(self.dist, [new])[0] > 0

    def _sweep(self) -> None:
        from dataflow.transport import sweep

        report = sweep(self.queue.conn)
        if report.removed_segments or report.removed_files:
            self.status.print(f"cleaned up: {report.summary()}")
        else:
            for note in report.notes:  # e.g. another user's file in /dev/shm, skipped
                self.status.print(note)

    def _stream_open(self) -> bool:
        return not self.meta.end_of_stream()

    def _drained(self) -> bool:
        counts = self.queue.counts()
        return (self.meta.end_of_stream() and counts["pending"] == 0 and counts["leased"] == 0
                and self.tasks.remaining() == 0)

    # ---- waiting, heartbeats, logs ----

    def _rollout_last_seen(self) -> float | None:
        rollouts = self.meta.processes(role="rollout")
        return max((p.heartbeat_at for p in rollouts), default=None)

    def _wait_reason(self) -> str:
        return wait_reason(self._rollout_last_seen(), clock.now())

    def _idle_too_long(self, idle_s: float) -> bool:
        if not self.options.exit_when_idle or idle_s < self.options.exit_when_idle:
            return False
        last = self._rollout_last_seen()
        return last is None or clock.now() - last > self.options.exit_when_idle

    def _waiting(self, reason: str, waited_s: float) -> None:
        self.status.show(f"{reason} ({waited_s:.0f}s)")
        self._heartbeat(reason)

    def _heartbeat(self, status: str, force: bool = False) -> None:
        if force or time.monotonic() - self._last_heartbeat > HEARTBEAT_EVERY_S:
            self.meta.heartbeat(self.process_id, "train", status, self._heartbeat_info())
            self._last_heartbeat = time.monotonic()

    def _beating(self, status: str):
        """Heartbeat and keep every held lease alive from a side thread through a long phase (control/beat.py)."""
        return beating_during(self.beat_with, RefQueue, self.process_id, "train", status, self._heartbeat_info(),
                              list(self.source.held), self.options.lease_ttl)

    def _heartbeat_info(self) -> dict:
        info = {"step": self.progress.step, "samples": self.progress.samples, "lost": self.source.lost}
        shown = ("loss", "acc_0", "tau_hat", "samples_per_s", "tokens_per_s", "val_tau_hat", "val_samples")
        return info | {k: round(v, 4) for k, v in (self._last_row | self._last_validation).items() if k in shown}

    def _log(self, window: Window) -> Window:
        if self.progress.step % self.options.log_every or not window.steps:  # not again after a step with no update
            return window
        row = window.summary(self.progress.step, self.step.last_lr)
        self._last_row = row
        if self.metrics is not None:
            self.metrics.write(row)
            self.status.step(describe(row))
        return Window()

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True


def wait_reason(rollout_last_seen: float | None, now: float) -> str:
    if rollout_last_seen is None:
        return "waiting for rollout (not started yet)"
    if now - rollout_last_seen < STALE_AFTER_S:
        return "waiting for data from the rollout"
    return f"waiting for rollout (last seen {now - rollout_last_seen:.0f}s ago)"


def train(db: Path, config: TrainConfig, options: TrainOptions, *, allow_network_fs: bool = False) -> str:
    """`dataflow train`: one rank (or one torchrun rank) on the run at `db`."""
    from dataflow.control.db import connect
    from dataflow.train.dist import close_dist, init_dist

    dist = init_dist(options.device)
    try:
        lock, refusal = hold_trainer_lock(db, dist.rank)  # before anything writes, heartbeats included
        refuse_unless_all_locked(refusal, all_true(dist, lock is not None))
        try:
            conn = connect(db, allow_network_fs=allow_network_fs)
            try:
                return Trainer(conn, config, options, dist).run()
            finally:
                conn.close()
        finally:
            lock.release()
    finally:
        close_dist(dist)
