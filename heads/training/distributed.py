"""torchrun's environment (or a single process): which device this process uses, and how processes combine their
results. Training and evaluation share it."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..devices import resolve_device


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: str | torch.device = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", 0)))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place on its device (NCCL needs the GPU's)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def shard(self, count: int) -> range:
        """This process's share of ``count`` evaluation samples: every ``world``-th one, from its rank."""
        return range(self.rank, count, self.world)

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order, on every process."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def broadcast(self, value):
        """Rank 0's ``value`` on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
