"""The consumer's side of every store of a run."""

from __future__ import annotations

from pathlib import Path

import torch

from dataflow.errors import FeaturesLost
from dataflow.transport.files import FilesReader
from dataflow.transport.segment import SHM_DIR
from dataflow.transport.shm import ShmReader


class Reader:
    """Opens any handle of the run as zero-copy views; arenas are mapped once, on first use, and stay
    mapped for the reader's life."""

    def __init__(self, shm_dir: Path = SHM_DIR):
        self._shm = ShmReader(shm_dir)
        self._files = FilesReader()
        self._ray = None  # RayReader, made on the first Ray handle (only Ray mode imports ray)

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        return self._store(handle).open(handle)

    def check(self, handle: dict) -> None:
        """FeaturesLost if the bytes behind an opened handle were reused since (shm; files never are)."""
        if handle.get("kind") == "shm":
            self._shm.check(handle)

    def release(self, handle: dict) -> None:
        """Done with this handle's views. The memory itself is freed by the ack (the ref's state in the
        database); views the caller still holds stay valid memory, but may be overwritten after the ack."""

    def retained(self, handle: dict) -> bool:
        """Whether the features outlive an ack (files do, arena ranges do not)."""
        return handle.get("kind") == "files" and self._files.retained(handle)

    def close(self) -> None:
        self._shm.close()

    def _store(self, handle: dict):
        kind = handle.get("kind")
        if kind == "shm":
            return self._shm
        if kind == "files":
            return self._files
        if kind == "ray":
            if self._ray is None:
                from dataflow.transport.ray_store import RayReader

                self._ray = RayReader()
            return self._ray
        raise FeaturesLost(f"handle of sample {handle.get('key')!r} names unknown store kind {kind!r}")
