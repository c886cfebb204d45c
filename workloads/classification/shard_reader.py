"""A shard set (`shard_manifest`) streamed by Ray Train workers: no copy of the data set on local disk.

Which samples a worker reads, in one epoch:
- The split's shards are put in an order: for training a permutation drawn from (seed, epoch), for validation the
  manifest's order. The samples of the shards in that order make one sequence of `total` samples.
- Training: each of the `world` ranks takes a contiguous run of `steps * batch` samples of that sequence, where
  `steps = (total // world) // batch`: every rank makes the same number of full steps (as DDP needs), no sample
  is read twice, and the last `total - world * steps * batch` samples of the epoch's order (fewer than
  `world * (batch + 1)`) are not used in that epoch; a new order each epoch leaves out other ones.
- Validation: rank r takes samples [r * total // world, (r + 1) * total // world): every image exactly once.
- Within a rank, the DataLoader's processes split the run again, in whole batches for training, so every batch
  is full; a training process shuffles what it reads through a buffer (seeded by seed, epoch, rank, process).
A rank reads only the shards its run touches, streaming each tar from the first sample it needs.

Items are `(image, label, failures)` like the folder path's (`data.TolerantImageFolder`): `failures` counts the
images that could not be read just before this one. Such an image (a truncated shard) is also named
(`on_bad(shard, what, reason)`) and left out; in training the next (or the last) good sample takes its place, so
that every rank still makes the same number of steps.
"""
from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from workloads.object_storage import Backoff, join, open_location


def epoch_order(shards: list[dict], epoch: int, seed: int, shuffle: bool) -> list[dict]:
    """The shards in this epoch's order."""
    order = list(shards)
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def rank_span(total: int, rank: int, world: int, batch: int | None) -> tuple[int, int]:
    """[start, end) of the epoch's sequence that `rank` reads: `batch` given (training): equal runs of whole
    batches; None (validation): all samples, the runs differing by at most one."""
    if batch is None:
        return rank * total // world, (rank + 1) * total // world
    per_rank = (total // world) // batch * batch
    return rank * per_rank, (rank + 1) * per_rank


def split_span(start: int, end: int, part: int, parts: int, batch: int | None) -> tuple[int, int]:
    """The share of DataLoader process `part` of `parts` in [start, end); in whole batches when `batch` is given."""
    unit = batch or 1
    units = (end - start) // unit if batch else end - start
    first, last = part * units // parts, (part + 1) * units // parts
    return start + first * unit, start + last * unit


def pieces(order: list[dict], start: int, end: int) -> Iterator[tuple[dict, int, int]]:
    """(shard, first, stop): the samples [first, stop) of each shard that [start, end) of the sequence covers."""
    offset = 0
    for shard in order:
        count = int(shard["samples"])
        lo, hi = max(start, offset), min(end, offset + count)
        if lo < hi:
            yield shard, lo - offset, hi - offset
        offset += count
        if offset >= end:
            return


def read_samples(fs, path: str, first: int, stop: int) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, class index) of samples [first, stop) of one shard, streamed in order."""
    # A 1 MiB read-ahead: unbuffered, each of tarfile's 10 KB reads would be a request of its own to a bucket
    # (about 3x the CPU per image, measured with `python -m benchmarks.data --s3-local`).
    with fs.open_input_stream(path, buffer_size=1 << 20) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        key, image, label, index = None, None, None, -1
        for member in tar:
            stem, _, ext = member.name.partition(".")
            if stem != key:
                if key is not None and index >= first and image is not None and label is not None:
                    yield key, image, label
                key, image, label, index = stem, None, None, index + 1
                if index >= stop:
                    return
            if index < first:
                continue  # tarfile skips the member's bytes when the next one is asked for
            data = tar.extractfile(member).read()
            if ext == "cls":
                label = int(data)
            else:
                image = data
        if key is not None and first <= index < stop and image is not None and label is not None:
            yield key, image, label


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's stream of (image, label) from a split of a shard set; `set_epoch` before each epoch."""

    def __init__(self, location: str, shards: list[dict], transform: Callable, *, rank: int, world: int,
                 batch: int | None, seed: int = 0, shuffle_buffer: int = 0, grayscale: bool = False,
                 on_bad: Callable[[str, str, str], None] | None = None, retry_limit_s: float = 300.0):
        self.location, self.shards, self.transform = location, list(shards), transform
        self.retry_limit_s = retry_limit_s
        self.rank, self.world, self.batch, self.seed = rank, world, batch, seed
        self.shuffle_buffer, self.mode = shuffle_buffer, "L" if grayscale else "RGB"
        self.on_bad = on_bad
        self.epoch = 0
        self.total = sum(int(s["samples"]) for s in self.shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        start, end = rank_span(self.total, self.rank, self.world, self.batch)
        return end - start

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = torch.utils.data.get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        start, end = split_span(*rank_span(self.total, self.rank, self.world, self.batch), part, parts, self.batch)
        samples = self._decoded(start, end)
        if self.batch is not None and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{part}")
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        return samples

    def _decoded(self, start: int, end: int) -> Iterator[tuple[Any, int, int]]:
        """The transformed samples of [start, end); in training each bad one is made up for by the next (or the
        last) good one, so the count never changes."""
        fs, root = open_location(self.location)
        order = epoch_order(self.shards, self.epoch, self.seed, shuffle=self.batch is not None)
        failures, owed, last = 0, 0, None
        for shard, first, stop in pieces(order, start, end):
            for item in self._shard_items(fs, join(root, shard["name"]), shard["name"], first, stop):
                if item is None:
                    failures += 1
                    owed += self.batch is not None
                    continue
                last = item
                yield (*item, failures)
                for _ in range(owed):
                    yield (*item, 0)
                failures = owed = 0
        if last is not None:
            for _ in range(owed):
                yield (*last, failures)
                failures = 0

    def _shard_items(self, fs, path: str, name: str, first: int, stop: int) -> Iterator[tuple[Any, int] | None]:
        """One item per sample of [first, stop) of a shard: (image, label), or None for one that cannot be read.
        A storage error (the bucket unreachable) reopens the shard where it stopped, with backoff, for up to
        `retry_limit_s`; a shard cut short (a tar error) is not retried."""
        seen, reason = 0, "the shard ends early"
        backoff = Backoff(self.retry_limit_s)
        while True:
            try:
                for key, data, label in read_samples(fs, path, first + seen, stop):
                    seen += 1
                    if backoff.since is not None:
                        backoff.succeeded(f"reading shard {name}")
                    try:
                        with Image.open(io.BytesIO(data)) as im:
                            image = im.convert(self.mode)
                    except Exception as err:  # noqa: BLE001 - PIL raises many types for a cut-off image
                        self._bad(name, key, f"{type(err).__name__}: {err}")
                        yield None
                        continue
                    yield self.transform(image), label
            except tarfile.TarError as err:  # a shard cut short: the rest of its samples are gone
                reason = f"{type(err).__name__}: {err}"
            except (FileNotFoundError, PermissionError) as err:
                reason = f"{type(err).__name__}: {err}"
            except OSError as err:
                backoff.failed(f"reading shard {name}", err)
                continue
            break
        if seen < stop - first:
            self._bad(name, f"{stop - first - seen} sample(s) from #{first + seen}", reason)
        for _ in range(stop - first - seen):
            yield None

    def _bad(self, shard: str, what: str, reason: str) -> None:
        if self.on_bad is not None:
            self.on_bad(shard, what, reason)


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A streaming shuffle: keep `size` items, emit a random one as each new one arrives."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
