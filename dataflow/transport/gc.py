"""Remove what a run left behind: arenas nobody writes or needs, and sample files nobody references.

A segment's producer is alive exactly when it holds the segment's writer lock (flock, dropped by the
kernel when the process dies, kill -9 included), which is sharper than a heartbeat on this host.
rollout and train call `sweep` at start; `dataflow gc --db run.sqlite` runs it by hand.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dataflow.control.meta import RunMeta
from dataflow.control.queue import RefQueue, RefState
from dataflow.transport.files_dir import STORE_META_PREFIX, SUFFIX, disk_usage, lock_writer
from dataflow.transport.refs import files_stores, handles_by_state, live_handles
from dataflow.transport.segment import HEADER_BYTES, SHM_DIR, human, read_header, try_lock


@dataclass(kw_only=True)
class SweepReport:
    removed_segments: list[str] = field(default_factory=list)
    kept_segments: list[str] = field(default_factory=list)  # "name (why)"
    removed_orphans: list[str] = field(default_factory=list)  # arenas of runs whose database is gone
    removed_files: int = 0
    freed_bytes: int = 0

    def summary(self) -> str:
        return (
            f"removed {len(self.removed_segments)} arenas and {self.removed_files} files of this run and "
            f"{len(self.removed_orphans)} arenas of deleted runs ({human(self.freed_bytes)}); "
            f"kept {len(self.kept_segments)} arenas"
        )


def run_prefix(run_id: str) -> str:
    return f"dataflow-{run_id[:12]}-"


def sweep(conn: sqlite3.Connection, *, shm_dir: Path = SHM_DIR, dry_run: bool = False) -> SweepReport:
    """This run's unneeded arenas and files, and the arenas of any run whose database no longer exists
    (e.g. a test's or a deleted run's) once nobody writes them."""
    report = SweepReport()
    meta = RunMeta(conn)
    own, finished = run_prefix(meta.run_id), meta.train_finished()
    for path in sorted(shm_dir.glob("dataflow-*")):
        if path.name.startswith(own):
            keep = functools.partial(_own_keep, conn, path.name, finished)
            _sweep_segment(path, keep, dry_run, report, own=True)
        else:
            _sweep_segment(path, _orphan_keep, dry_run, report, own=False)
    for store, directory in files_stores(conn, STORE_META_PREFIX).items():
        _sweep_files(conn, store, Path(directory), dry_run, report)
    return report


def _own_keep(conn: sqlite3.Connection, name: str, finished: bool, arena: bool, nonce: int, owner_db: str) -> str | None:
    live = arena and any(h.get("nonce") == nonce for h in live_handles(conn, name))
    return "holds samples the trainer has not consumed" if live and not finished else None


def _orphan_keep(arena: bool, nonce: int, owner_db: str) -> str | None:
    if arena and owner_db and not Path(owner_db).exists():
        return None
    return ""  # another run's business: keep, and do not list it


def _sweep_segment(
    path: Path, keep: Callable[[bool, int, str], str | None], dry_run: bool, report: SweepReport, *, own: bool
) -> None:
    """Remove `path` unless a producer holds it or keep(is arena, nonce, owner db) gives a reason
    ("" keeps it unlisted: another run's arena)."""
    fd = try_lock(path)
    if fd is None:
        if own:
            report.kept_segments.append(f"{path.name} (its producer is running)")
        return
    try:
        reason = keep(*read_header(fd))
        if reason is not None:
            if reason:
                report.kept_segments.append(f"{path.name} ({reason})")
            return
        report.freed_bytes += os.fstat(fd).st_size
        (report.removed_segments if own else report.removed_orphans).append(path.name)
        if not dry_run:
            path.unlink(missing_ok=True)  # under the lock: a producer starting now waits, then re-creates
    finally:
        os.close(fd)


def _sweep_files(conn: sqlite3.Connection, store: str, directory: Path, dry_run: bool, report: SweepReport) -> None:
    """Files of LOST refs go; files no ref names go once their writer is gone (its uncommitted writes).
    Files of live, acked and trained refs stay: later epochs and offline runs read them."""
    if not directory.is_dir():
        return
    rows = handles_by_state(conn, store)
    needed = {h["path"] for h, state in rows if state != RefState.LOST}
    named = {h["path"] for h, _ in rows}
    writer_fd = lock_writer(directory, None)
    try:
        for path in list(directory.glob(f"*{SUFFIX}")) + list(directory.glob("*.partial")):
            if str(path) in needed or (str(path) not in named and writer_fd is None):
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
    for path in sorted(shm_dir.glob(run_prefix(RunMeta(conn).run_id) + "*")):
        try:
            capacity = path.stat().st_size - HEADER_BYTES
        except FileNotFoundError:
            continue
        out.append({"kind": "shm", "store": path.name, "capacity": capacity, "live_bytes": queue.live_bytes(path.name)})
    for store, directory in files_stores(conn, STORE_META_PREFIX).items():
        disk_bytes, files = disk_usage(Path(directory))
        out.append(
            {"kind": "files", "store": store, "dir": directory, "disk_bytes": disk_bytes, "files": files,
             "live_bytes": queue.live_bytes(store)}
        )
    return out
