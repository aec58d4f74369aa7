"""Data parallelism without a wrapper: ranks agree on counts and flags, and sum gradients by hand.

Each rank's loss is its summed token losses divided by the *global* token count of the step, so summing
gradients over ranks gives exactly the one-rank update over the union of the ranks' samples.
Launched by torchrun (RANK/WORLD_SIZE in the environment): gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from dataflow.errors import InputError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {preference}: no CUDA device visible; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_dist(device_preference: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not torch_dist.is_initialized():
        # Dynamo keeps a reference to the default group when it is first imported after the group exists (the
        # optimiser imports it), and then destroy_process_group cannot free the group: gloo's worker threads
        # outlive it into interpreter shutdown, where one dropping the last reference to a collective's tensor
        # takes the GIL and aborts the rank ("terminate called without an active exception"; seen in CI).
        import torch._dynamo  # noqa: F401

        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=device)


def close_dist(dist: Dist) -> None:
    if dist.world > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_sum(dist: Dist, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64 so integer counts stay exact)."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(dist))
    torch_dist.all_reduce(t)
    return t.tolist()  # syncs with the device


def all_true(dist: Dist, flag: bool) -> bool:
    return all_sum(dist, [float(flag)])[0] == dist.world


def sum_gradients(dist: Dist, params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over ranks (missing gradients count as zero)."""
    if dist.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad)


def gather_ints(dist: Dist, values: list[int]) -> list[int]:
    if dist.world == 1:
        return list(values)
    out: list[list[int]] = [[] for _ in range(dist.world)]
    torch_dist.all_gather_object(out, list(values))
    return sorted(v for part in out for v in part)


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        torch_dist.barrier()


def _comm_device(dist: Dist) -> torch.device:
    return dist.device if dist.device.type == "cuda" else torch.device("cpu")
