"""One named shared-memory file in /dev/shm, mapped once per process.

We open /dev/shm/<name> directly rather than through `multiprocessing.shared_memory`: on Python 3.11
its resource_tracker unlinks a segment when any process that merely attached to it exits, which would
pull the arena from under the producer. Plain files have no tracker; only gc and the producer unlink.

Layout: a 4 KiB segment header (magic, capacity, nonce, next generation, then the owner: run id and
database file, see owner.py), then the data area. The nonce is drawn when the segment is created, so
handles into an earlier segment of the same name are refused.

The file is sized at creation but its pages are reserved range by range as samples are written
(`reserve`), so a tiny run with the default 1 GiB watermark takes only the memory its samples use, and a
full /dev/shm is still a clear error at the write, not a SIGBUS on first touch.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import struct
import time
from pathlib import Path

from filelock import lock_descriptor

from dataflow.errors import FeaturesLost, StoreError
from dataflow.transport.owner import Owner

SHM_DIR = Path("/dev/shm")
HEADER_BYTES = 4096  # keeps the data area page aligned
SEGMENT_HEADER = struct.Struct("<8sQQQ")  # magic, capacity, nonce, next generation
SEGMENT_MAGIC = b"DFARENA1"
# Two u16-length-prefixed blocks: the database path where earlier versions read it (their gc removes an
# arena whose path does not exist, so it must stay there), then the owner's JSON (owner.py).
PATH_AT, OWNER_AT = 64, 2048
BLOCK_MAX = HEADER_BYTES - OWNER_AT - 2
LOCK_WAIT_S = 2.0  # gc holds a segment's lock for a moment while it decides; wait that out
LOCK_POLL_S = 0.05


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_shm_space(nbytes: int, directory: Path = SHM_DIR) -> None:
    """Refuse up front when /dev/shm cannot hold the arena (Docker's default is 64 MB)."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise StoreError(_too_small(nbytes, free, directory))


def _too_small(nbytes: int, free: int, directory: Path) -> str:
    suggest = max(1, -(-int(nbytes * 1.25) // 2**30))
    return (
        f"{directory} has {human(free)} free but the feature arena needs {human(nbytes)} "
        f"(--max-inflight-bytes); start the container with --shm-size={suggest}g or --ipc=host, "
        "or pass a smaller --max-inflight-bytes"
    )


def _map(fd: int, size: int) -> mmap.mmap:
    # No MAP_POPULATE: on tmpfs it would allocate every page of the arena, which is reserved lazily.
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class Segment:
    """A mapped segment. `buf` is a memoryview over the whole mapping; tensor views slice it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise FeaturesLost(f"{path}: not a dataflow arena (only {size} bytes)")
        self.mm = _map(fd, size)
        self.buf = memoryview(self.mm)
        magic, self.capacity, self.nonce, _ = SEGMENT_HEADER.unpack_from(self.buf, 0)
        if magic != SEGMENT_MAGIC or HEADER_BYTES + self.capacity != size:
            self.buf.release()
            self.mm.close()
            raise FeaturesLost(f"{path}: not a dataflow arena (bad header); remove it with `dataflow gc`")
        self.owner = _owner_at(bytes(self.buf[:HEADER_BYTES]))
        self.inode = os.fstat(fd).st_ino

    @classmethod
    def attach(cls, path: Path) -> "Segment":
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise FeaturesLost(f"{path}: the arena is gone (its producer's memory was freed)") from None
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: Path, capacity: int, owner: Owner) -> "Segment":
        """A fresh segment with a new nonce, stamped with its owner (magic last: a segment half-created by a
        killed producer is no arena); the caller holds no lock yet (see lock())."""
        check_shm_space(HEADER_BYTES + capacity, path.parent)
        stamp, db_path = owner.to_json().encode(), owner.db_path.encode()
        if len(stamp) > BLOCK_MAX:
            raise StoreError(f"{path}: the run database path is too long to record ({owner.db_path[:60]}...)")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, HEADER_BYTES + capacity)  # sized, not reserved: see reserve()
            _reserve(fd, 0, HEADER_BYTES, path)
            os.pwrite(fd, struct.pack("<H", len(db_path)) + db_path, PATH_AT)
            os.pwrite(fd, struct.pack("<H", len(stamp)) + stamp, OWNER_AT)
            os.pwrite(fd, SEGMENT_HEADER.pack(SEGMENT_MAGIC, capacity, secrets.randbits(63), 1), 0)
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    def still_named(self) -> bool:
        """Whether the path still names this segment (gc may have unlinked it; a new one may exist)."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False

    def reserve(self, offset: int, length: int) -> None:
        """Allocate the tmpfs pages of a range before writing it (cheap once they are allocated)."""
        _reserve(self.fd, offset, length, self.path)

    def next_generation(self) -> int:
        """Generations are unique per segment and survive a producer restart (they live in the header)."""
        magic, capacity, nonce, gen = SEGMENT_HEADER.unpack_from(self.buf, 0)
        SEGMENT_HEADER.pack_into(self.buf, 0, magic, capacity, nonce, gen + 1)
        return gen

    def lock(self, owner: str) -> None:
        """Exclusive writer lock, held for the writer's life; the kernel drops it when the process dies,
        which is how gc tells a live producer from a dead one on this host."""
        if not hold_lock(self.fd, LOCK_WAIT_S):
            raise StoreError(
                f"{self.path}: another producer is writing this arena; give each rollout its own "
                f"--producer-id (this one is {owner!r})"
            )

    def close(self) -> bool:
        """Unmap if no tensor views remain; returns False (and stays mapped) while views exist."""
        self.buf.release()
        try:
            self.mm.close()
        except BufferError:
            return False  # a live view: the mapping goes away with the last view instead
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        return True


def _reserve(fd: int, offset: int, length: int, path: Path) -> None:
    """Allocate tmpfs pages now: a full /dev/shm is a clear error here, not a SIGBUS on first touch."""
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            st = os.statvfs(path.parent)
            raise StoreError(_too_small(length, st.f_bavail * st.f_frsize, path.parent)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: not reserved
            raise


def _owner_at(raw: bytes) -> Owner | None:
    (n,) = struct.unpack_from("<H", raw, OWNER_AT)
    return Owner.from_json(raw[OWNER_AT + 2 : OWNER_AT + 2 + min(n, BLOCK_MAX)].decode(errors="replace"))


def read_header(fd: int) -> tuple[bool, int, Owner | None]:
    """(is a dataflow arena, nonce, owner) from an open segment file."""
    raw = os.pread(fd, HEADER_BYTES, 0).ljust(HEADER_BYTES, b"\0")
    magic, _, nonce, _ = SEGMENT_HEADER.unpack_from(raw, 0)
    return magic == SEGMENT_MAGIC, nonce, _owner_at(raw)


def hold_lock(fd: int, wait_s: float = 0.0) -> bool:
    """Take the exclusive writer lock of an open file, waiting up to `wait_s` for a momentary holder (gc
    deciding); False when it is still held. filelock's flock on our own fd, not a FileLock on the path: the
    lock must be on the very inode this process mapped or opened, and the kernel drops it when we die."""
    deadline = time.monotonic() + wait_s
    while not lock_descriptor(fd, blocking=False):
        if time.monotonic() >= deadline:
            return False
        time.sleep(LOCK_POLL_S)
    return True


def try_lock(path: Path) -> int | None:
    """For gc: an fd holding the writer lock of `path` (nobody writes it), or None (a producer does).
    PermissionError: the file is not ours to open (another user's)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    if hold_lock(fd):
        return fd
    os.close(fd)
    return None
