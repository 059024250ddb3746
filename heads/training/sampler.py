"""The training sampler: micro-batches laid out so that any process count and any resume see the same data."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..data import sample_seed
from .config import ConfigError


class StepSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(index, seed)`` for one process, laid out so that runs agree step by step.

    Each epoch shuffles with ``(seed, epoch)``; optimizer step ``s`` takes the slice ``s`` of
    ``world * accumulate * batch_size`` indices and process ``r`` gets micro-batches
    ``r * accumulate ... r * accumulate + accumulate - 1`` of it. A 2-process run and a 1-process run
    with ``accumulate=2`` therefore see the same micro-batches; ``start_step`` resumes mid-epoch and ``stop_step``
    ends an epoch early (a run's step budget).
    Each sample carries its own augmentation seed (run seed, epoch, index).
    """

    def __init__(self, size: int, batch_size: int, accumulate: int = 1, world: int = 1, rank: int = 0,
                 seed: int = 0):
        self.size, self.batch_size, self.accumulate, self.world, self.rank = size, batch_size, accumulate, world, rank
        self.seed, self.epoch, self.start_step, self.stop_step = seed, 0, 0, None
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {size} samples, fewer than one global batch of "
                              f"{batch_size * accumulate * world} (batch_size x accumulate x processes); lower "
                              "batch_size or accumulate")

    @property
    def steps_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.accumulate * self.world)

    def set_epoch(self, epoch: int, start_step: int = 0, stop_step: int | None = None) -> None:
        self.epoch, self.start_step, self.stop_step = epoch, start_step, stop_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        step_size = self.batch_size * self.accumulate * self.world
        for step in range(self.start_step, self.stop):
            for micro in range(self.rank * self.accumulate, (self.rank + 1) * self.accumulate):
                start = step * step_size + micro * self.batch_size
                yield [(i, sample_seed(self.seed, self.epoch, i)) for i in order[start:start + self.batch_size]]

    @property
    def stop(self) -> int:
        return self.steps_per_epoch if self.stop_step is None else min(self.stop_step, self.steps_per_epoch)

    def __len__(self) -> int:
        return (self.stop - self.start_step) * self.accumulate
