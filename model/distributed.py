"""Training past one device with PyTorch's own engine: ``torchrun`` starts the processes, torch.distributed
(NCCL on CUDA, gloo on CPU) and DistributedDataParallel do the rest; nothing here is a cluster of our own.

The global batch is the config's ``batch_size`` whatever the number of processes: each optimizer step reads
the same images in the same order (model.data.sampler), split between the ranks and, with gradient
accumulation, into micro-batches. So the learning-rate schedule per image seen, the data order and an exact
resume do not depend on the world size. A plain ``python -m model.train`` is a world of one, with no
process group at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    grouped: bool = False  # in a torch.distributed process group (torchrun), even of one

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and TensorBoard, and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Launched by torchrun: DDP and the collectives run, whatever the number of processes."""
        return self.grouped


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (its environment variables), on NCCL for CUDA and gloo for the
    CPU; each rank on its own GPU. Outside torchrun: a world of one on ``device``."""
    if not launched_by_torchrun():
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]), True)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """The loss terms averaged over the ranks (what is logged); the values as they are in a world of one."""
    if not world.distributed:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world.size).tolist(), strict=True))


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on one (a stop signal must stop all ranks at the same step)."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gathered(items: list, world: World) -> list:
    """Every rank's ``items`` concatenated in rank order (on every rank): the global batch's image ids."""
    if not world.distributed:
        return items
    lists: list[list] = [[] for _ in range(world.size)]
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


class RankBatches(Sampler[list[int]]):
    """This rank's micro-batches of the global batches ``batches`` yields: rank r reads the r-th of
    ``world.size`` equal slices of each global batch, in ``accumulate`` micro-batches."""

    def __init__(self, batches: Sampler[list[int]], batch_size: int, world: World, accumulate: int) -> None:
        per_rank, left = divmod(batch_size, world.size * accumulate)
        if left or not per_rank:
            raise ValueError(
                f"batch_size {batch_size} (the global batch) must be a multiple of the {world.size} processes x "
                f"{accumulate} accumulate_steps"
            )
        self.batches, self.world, self.per_rank = batches, world, per_rank
        self.accumulate = accumulate

    def __iter__(self) -> Iterator[list[int]]:
        size = self.per_rank * self.accumulate
        for batch in self.batches:
            mine = batch[self.world.rank * size : (self.world.rank + 1) * size]
            for k in range(self.accumulate):
                yield mine[k * self.per_rank : (k + 1) * self.per_rank]
