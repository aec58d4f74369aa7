"""Remove what a run left behind: rows of trained refs nothing reads again (compaction), arenas nobody
writes or needs, and sample files nobody references.

A segment's producer is alive exactly when it holds the segment's writer lock (flock, dropped by the
kernel when the process dies, kill -9 included), which is sharper than a heartbeat on this host.
rollout and train call `sweep` at start (train also compacts after each checkpoint); `dataflow gc --db
run.sqlite` runs it by hand. Files in /dev/shm this user cannot open (another user's) are skipped and noted.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from dataflow.control import clock
from dataflow.control.meta import RunMeta
from dataflow.control.queue import COMPACT_BATCH, RATE_WINDOW_S, RefQueue, RefState
from dataflow.transport.files_dir import STORE_META_PREFIX, SUFFIX, disk_usage, lock_writer, read_owner, recorded_stores, sample_name
from dataflow.transport.owner import Owner, owner_of, provably_finished, store_name
from dataflow.transport.refs import handles_by_state, live_handles
from dataflow.transport.segment import HEADER_BYTES, SHM_DIR, human, read_header, try_lock


@dataclass(kw_only=True)
class SweepReport:
    removed_segments: list[str] = field(default_factory=list)
    kept_segments: list[str] = field(default_factory=list)  # "name (why)"
    removed_orphans: list[str] = field(default_factory=list)  # other runs' arenas: finished, or --all-orphans
    kept_orphans: list[str] = field(default_factory=list)  # other runs' arenas nobody writes: "name (whose)"
    removed_files: int = 0
    freed_bytes: int = 0
    compacted_refs: int = 0  # trained refs whose rows became bare keys
    notes: list[str] = field(default_factory=list)  # what was skipped, one line each

    def summary(self) -> str:
        line = (
            f"removed {len(self.removed_segments)} arenas and {self.removed_files} files of this run and "
            f"{len(self.removed_orphans)} arenas of other runs ({human(self.freed_bytes)}); "
            f"kept {len(self.kept_segments)} arenas; compacted {self.compacted_refs} trained refs"
        )
        if self.kept_orphans:
            line += (
                f"; left {len(self.kept_orphans)} arenas of other unfinished or unknown runs alone "
                "(`dataflow gc --all-orphans` removes those no producer holds)"
            )
        return "\n".join([line, *self.notes])


class Action(Enum):
    REMOVE = "remove"
    KEEP = "keep"  # stays, listed in the report with why
    IGNORE = "ignore"  # not a dataflow arena of ours (half-created by another run, or not dataflow's): unlisted


@dataclass(frozen=True)
class Verdict:
    """What to do with a segment nobody writes."""

    action: Action
    own: bool  # this run's: reported as its own arenas, not as other runs' orphans
    why: str = ""  # for KEEP


def compact_trained(queue: RefQueue, meta: RunMeta, *, batch: int = COMPACT_BATCH, before: float | None = None) -> int:
    """Compact the trained refs of checkpoints recorded before `before` (default: older than the status rates'
    window, which reads their timestamps), batch by batch, each batch its own short write transaction (see
    RefQueue.compact); returns how many became bare keys. The first epoch of files stores keeps its rows:
    `train --epochs` replays it from their handles. Takes the queue and meta, not a connection, so that a
    trainer in Ray mode compacts through the ledger."""
    through = meta.checkpoint_before(clock.now() - RATE_WINDOW_S if before is None else before)
    replay_stores = sorted(meta.with_prefix(STORE_META_PREFIX))
    compacted = 0
    while True:
        step = queue.compact(through_checkpoint=through, replay_stores=replay_stores, limit=batch)
        compacted += step.compacted
        if step.examined < batch:
            return compacted


def sweep(
    conn: sqlite3.Connection, *, shm_dir: Path = SHM_DIR, dry_run: bool = False, all_orphans: bool = False
) -> SweepReport:
    """This run's unneeded arenas and files; another run's arenas only once that run is provably finished
    (its own database says so) or with all_orphans. Arenas are told apart by the owner stamped in their
    header (run id and database file), never by path, so a moved run or a copied database is not mistaken
    for a run that is gone."""
    report, me = SweepReport(), owner_of(conn)
    if not dry_run:  # first: the files of refs compacted now are unnamed, and go below once their writer is gone
        report.compacted_refs = compact_trained(RefQueue(conn), RunMeta(conn))
    for path in sorted(shm_dir.glob("dataflow-*")):
        mine = path.name.startswith(store_name("dataflow", me.run_id))
        decide = functools.partial(_judge, conn, path.name, me, all_orphans)
        try:
            _sweep_segment(path, decide, dry_run, report, mine=mine)
        except PermissionError:
            report.notes.append(f"skipped {path}: not readable by this user (another user's run?)")
    stores, notes = recorded_stores(conn, me.run_id)
    report.notes += notes
    for store, directory in stores.items():
        _sweep_files(conn, store, directory, me, dry_run, report)
    return report


def _judge(
    conn: sqlite3.Connection, name: str, me: Owner, all_orphans: bool, arena: bool, nonce: int, owner: Owner | None
) -> Verdict:
    """An arena nobody writes: this run's stays while any PENDING or LEASED ref points into it, whatever else
    the run says; another run's goes once that run is provably finished (or with all_orphans)."""
    if arena and me.same_database(owner):
        live = any(h.get("nonce") == nonce for h in live_handles(conn, name))
        return Verdict(Action.KEEP, True, "holds samples the trainer has not consumed") if live else Verdict(Action.REMOVE, True)
    if not arena:  # half-created (its producer died before any sample could be written), or not dataflow's
        ours = name.startswith(store_name("dataflow", me.run_id))
        return Verdict(Action.REMOVE if ours else Action.IGNORE, ours)
    if all_orphans or provably_finished(owner):
        return Verdict(Action.REMOVE, False)
    whose = owner.describe() if owner is not None else "an unknown run"
    return Verdict(Action.KEEP, False, f"{whose}, not finished")


def _sweep_segment(
    path: Path, decide: Callable[[bool, int, Owner | None], Verdict], dry_run: bool, report: SweepReport, *, mine: bool
) -> None:
    """Remove `path` unless a producer holds it or decide(is arena, nonce, owner) says otherwise."""
    fd = try_lock(path)
    if fd is None:
        if mine:
            report.kept_segments.append(f"{path.name} (its producer is running)")
        return
    try:
        verdict = decide(*read_header(fd))
        if verdict.action is Action.KEEP:
            (report.kept_segments if verdict.own else report.kept_orphans).append(f"{path.name} ({verdict.why})")
        if verdict.action is not Action.REMOVE:
            return
        report.freed_bytes += os.fstat(fd).st_blocks * 512  # the pages it holds (reserved lazily)
        (report.removed_segments if verdict.own else report.removed_orphans).append(path.name)
        if not dry_run:
            path.unlink(missing_ok=True)  # under the lock: a producer starting now waits, then re-creates
    finally:
        os.close(fd)


def _sweep_files(
    conn: sqlite3.Connection, store: str, directory: Path, me: Owner, dry_run: bool, report: SweepReport
) -> None:
    """Files of LOST refs go; files no ref names go once their writer is gone (its uncommitted writes, and
    the files of compacted refs). Files of live, acked and trained refs stay: later epochs read them. Only a directory
    stamped with this database as its owner is touched (not a copy's, not one a crafted record names)."""
    if not directory.is_dir():
        return
    found = read_owner(directory)
    if not me.same_database(found):
        whose = found.describe() if found is not None else "no recorded run"
        report.notes.append(f"skipped files store {directory}: it belongs to {whose}, not to this database")
        return
    rows = handles_by_state(conn, store)
    needed = {sample_name(h) for h, state in rows if state != RefState.LOST}
    named = {sample_name(h) for h, _ in rows}
    writer_fd = lock_writer(directory, None)
    try:
        for path in list(directory.glob(f"*{SUFFIX}")) + list(directory.glob("*.partial")):
            if path.name in needed or (path.name not in named and writer_fd is None):
                continue
            report.freed_bytes += path.stat().st_size
            report.removed_files += 1
            if not dry_run:
                path.unlink(missing_ok=True)
    finally:
        if writer_fd is not None:
            os.close(writer_fd)


def usage(conn: sqlite3.Connection, *, shm_dir: Path = SHM_DIR) -> list[dict]:
    """Per store of this run: size, bytes in flight, and (files) disk use; for `dataflow status`."""
    queue, out = RefQueue(conn), []
    for path in sorted(shm_dir.glob(store_name("dataflow", RunMeta(conn).run_id) + "*")):
        try:
            capacity = path.stat().st_size - HEADER_BYTES
        except FileNotFoundError:
            continue
        out.append({"kind": "shm", "store": path.name, "capacity": capacity, "live_bytes": queue.live_bytes(path.name)})
    for store, directory in recorded_stores(conn, RunMeta(conn).run_id)[0].items():
        disk_bytes, files = disk_usage(directory)
        out.append(
            {"kind": "files", "store": store, "dir": str(directory), "disk_bytes": disk_bytes, "files": files,
             "live_bytes": queue.live_bytes(store)}
        )
    return out
