"""The step-exact training order: the same global batches whatever the number of workers, resumable at any step.

Used when the worker count is a range (`scaling.num_workers: [min, max]`) or when checkpoints are written inside
epochs (`run.checkpoint_every_steps`). An epoch is a permutation of the training split (a function of the seed
and the epoch); optimizer step `k` takes the next `slots x micro_batch` samples of it, cut into `slots`
micro-batches (`slots` is the range's `max`). Worker `r` of `w` runs micro-batches `r, r + w, r + 2w, ...` of
every step, accumulating gradients, so the global batch, its micro-batches (the batch-norm statistics) and the
schedule's position are those of `max` workers, at any `w`. Each sample's augmentation is drawn from a seed of
its own (seed, epoch, index), so neither the worker count nor a restart changes what a sample looks like.

Samples past the last whole global batch of an epoch are left out of that epoch (as `drop_last` does); the
permutation changes every epoch, so no sample is always left out.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from workloads.classification.reproducibility import seed_everything


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, step, ...): stable across processes and Python versions."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GlobalBatchOrder:
    """Which samples each micro-batch of each optimizer step holds (module docstring)."""

    def __init__(self, length: int, micro_batch: int, slots: int, seed: int):
        if micro_batch < 1 or slots < 1:
            raise ValueError(f"micro_batch and slots must be >= 1, got {micro_batch} and {slots}")
        self.length, self.micro_batch, self.slots, self.seed = length, micro_batch, slots, seed
        self.steps_per_epoch = length // (micro_batch * slots)

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, 0x5A3D))
        return torch.randperm(self.length, generator=generator).tolist()

    def slots_of(self, rank: int, world: int) -> range:
        """The micro-batch slots worker `rank` of `world` runs in every step."""
        if not 0 <= rank < world <= self.slots:
            raise ValueError(f"worker {rank} of {world}: the order has {self.slots} slots per step "
                             "(world must be at most the range's max)")
        return range(rank, self.slots, world)

    def micro_batches(self, epoch: int, rank: int, world: int, start_step: int = 0) -> Iterator[list[int]]:
        """Worker `rank`'s micro-batches of `epoch` from optimizer step `start_step` on, step after step."""
        order = self.permutation(epoch)
        b, per_step = self.micro_batch, self.micro_batch * self.slots
        for step in range(start_step, self.steps_per_epoch):
            for slot in self.slots_of(rank, world):
                first = step * per_step + slot * b
                yield order[first:first + b]


class StepBatchSampler:
    """A DataLoader `batch_sampler` over a `GlobalBatchOrder`: worker `rank`'s micro-batches of the epoch and
    start step set by `set_position`, each index paired with its sample's seed (read by `SeededSamples`)."""

    def __init__(self, order: GlobalBatchOrder, rank: int, world: int):
        self.order, self.rank, self.world = order, rank, world
        self.per_step = len(order.slots_of(rank, world))
        self.epoch, self.start_step = 1, 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seed, epoch = self.order.seed, self.epoch
        for batch in self.order.micro_batches(epoch, self.rank, self.world, self.start_step):
            yield [(index, derived_seed(seed, epoch, index)) for index in batch]

    def __len__(self) -> int:
        return (self.order.steps_per_epoch - self.start_step) * self.per_step


class SeededSamples(torch.utils.data.Dataset):
    """`dataset[index]` with Python's, NumPy's and torch's generators seeded for that one sample, for keys
    `(index, seed)`: the sample's random augmentation does not depend on which process loads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_everything(seed)
        return self.dataset[index]
