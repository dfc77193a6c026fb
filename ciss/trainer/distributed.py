"""Process-group set-up for `torchrun` (gloo on CPU, NCCL on CUDA) and the batch sharding.

The global batch is fixed and each process takes an equal, contiguous slice of it, so N
processes see exactly the samples one process would, in the same iteration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ciss.errors import CissError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place and returned; identity in a single process)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise CissError(f"unknown device '{choice}'; use auto, cpu or cuda")
    if choice == "cuda" and not torch.cuda.is_available():
        raise CissError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def world_size() -> int:
    """How many processes torchrun started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_choice: str) -> Dist:
    """Join the process group when launched by torchrun; a single process otherwise."""
    world = world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatches(Sampler[list[tuple[int, int]]]):
    """Batches of (position, epoch) keys: a seeded permutation per epoch, cut into global
    batches, of which this process takes its slice. `start` skips batches when resuming."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epoch: int,
                 start: int = 0):
        if global_batch % world:
            raise CissError(f"batch size {global_batch} cannot be split evenly over {world} processes")
        if n < global_batch:
            raise CissError(f"only {n} training images for this step but the batch size is {global_batch}; "
                            "use a smaller --batch-size or more data")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.epoch, self.start = seed, epoch, start

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        per = self.global_batch // self.world
        for b in range(self.start, self.n // self.global_batch):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield [(int(i), self.epoch) for i in chunk[self.rank * per:(self.rank + 1) * per]]


def shard(n: int, rank: int, world: int) -> list[int]:
    """Positions this process handles in a pass where every item is seen once (eval, prepare)."""
    return list(range(rank, n, world))
