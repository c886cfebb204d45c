"""ImageNet-layout data for the classification workload: scanning, verification, datasets, transforms.

The layout is torchvision's ImageFolder one: `root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`.

Unreadable files (zero bytes, corrupt, truncated) are found once, cheaply, on the driver by `scan_split`
(PIL `verify()` plus a check for the JPEG end-of-image marker) and handed to the workers as a skip list,
so every worker sees the same sample list. Anything that still fails to decode at load time is replaced
by the next readable sample and counted (`TolerantImageFolder` returns the number of failures with each
sample), so one bad file never stops a long run. Empty class folders and empty splits raise ValueError
before any training starts.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from workloads.classification.config import ShardPlan
from workloads.classification.shard_reader import ShardStream

log = logging.getLogger(__name__)

# Samples a training stream of a shard set mixes at once (on top of the per-epoch order of its shards).
SHUFFLE_BUFFER = 2000
# How far from the end of a JPEG file the end-of-image marker may sit (some encoders pad files).
_JPEG_TAIL = 1024


@dataclass
class SplitScan:
    """What `scan_split` found in one split folder."""

    root: str
    classes: list[str]
    counts: dict[str, int]  # readable images per class folder
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, reason)
    missing_classes: list[str] = field(default_factory=list)  # expected class folders that are absent
    images: list[tuple[str, str]] = field(default_factory=list)  # (class, path relative to root), readable, sorted

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())

    @property
    def skipped(self) -> list[str]:
        return [rel for rel, _ in self.bad]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def check_image(path: str) -> str | None:
    """Why the image at `path` is unreadable, or None when it looks fine. Cheap: no full decode."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "zero-byte file"
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            # verify() does not notice a JPEG cut short; a complete one ends with the EOI marker.
            with open(path, "rb") as fh:
                fh.seek(max(0, size - _JPEG_TAIL))
                if b"\xff\xd9" not in fh.read():
                    return "truncated JPEG (no end-of-image marker)"
    except Exception as err:  # noqa: BLE001 - PIL raises many types (UnidentifiedImageError, SyntaxError...)
        return f"{type(err).__name__}: {err}"
    return None


def list_class_folders(split_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def scan_split(
    split_dir: str,
    classes: list[str] | None = None,
    *,
    verify: bool = True,
    threads: int = 8,
    progress: Callable[[str], None] | None = None,
) -> SplitScan:
    """List (and verify) the images of one split folder.

    `classes` fixes the class list (the validation split uses the training classes); by default it is
    the sorted list of sub-folders. Raises ValueError when the folder is missing, holds no class folders,
    a class folder has no readable image, or a class folder is not a training class.
    """
    if not os.path.isdir(split_dir):
        raise ValueError(f"data folder {split_dir} does not exist (expected <root>/train and <root>/val)")
    present = list_class_folders(split_dir)
    if classes is None:
        classes = present
        if not classes:
            raise ValueError(f"{split_dir} is empty: expected one sub-folder of images per class")
    else:
        extra = sorted(set(present) - set(classes))
        if extra:
            raise ValueError(
                f"{split_dir} has class folders that are not in the training split: {', '.join(extra[:5])}"
            )
    files: list[tuple[str, str]] = []  # (class, relative path)
    for cls in classes:
        folder = os.path.join(split_dir, cls)
        if not os.path.isdir(folder):
            continue
        for dirpath, _dirs, names in os.walk(folder, followlinks=True):
            for name in names:
                if is_image_file(name):
                    files.append((cls, os.path.relpath(os.path.join(dirpath, name), split_dir)))
    files.sort()

    reasons: list[str | None]
    if verify:
        say = progress or (lambda _m: None)
        start = last = time.perf_counter()
        reasons = []
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            paths = (os.path.join(split_dir, rel) for _, rel in files)
            for i, reason in enumerate(pool.map(check_image, paths, chunksize=64)):
                reasons.append(reason)
                now = time.perf_counter()
                if now - last > 5.0:
                    say(f"  verified {i + 1}/{len(files)} images in {split_dir} ({now - start:.0f} s)")
                    last = now
    else:
        reasons = [None] * len(files)

    counts = {cls: 0 for cls in classes}
    bad: list[tuple[str, str]] = []
    images: list[tuple[str, str]] = []
    for (cls, rel), reason in zip(files, reasons):
        if reason is None:
            counts[cls] += 1
            images.append((cls, rel))
        else:
            bad.append((rel, reason))
    missing = [cls for cls in classes if not os.path.isdir(os.path.join(split_dir, cls))]
    empty = [cls for cls in classes if counts[cls] == 0 and cls not in missing]
    if empty:
        folder = os.path.join(split_dir, empty[0])
        more = f" (and {len(empty) - 1} more class folders)" if len(empty) > 1 else ""
        raise ValueError(f"class folder {folder} has no readable images{more}")
    if sum(counts.values()) == 0:
        raise ValueError(f"{split_dir} has no readable images")
    return SplitScan(root=split_dir, classes=list(classes), counts=counts, bad=bad, missing_classes=missing,
                     images=images)


class TolerantImageFolder(ImageFolder):
    """ImageFolder with a fixed class list, a skip list, and tolerant loading.

    Items are `(image, target, failures)`: `failures` counts the files that failed to decode before
    a readable one was found (0 almost always), so the training loop can count them.
    """

    def __init__(self, root: str, classes: list[str], skip=(), transform=None, max_tries: int = 16):
        self._fixed_classes = list(classes)
        self._skip = {os.path.normpath(os.path.join(root, rel)) for rel in skip}
        self._max_tries = max_tries
        super().__init__(root, transform=transform, is_valid_file=self._valid, allow_empty=True)

    def _valid(self, path: str) -> bool:
        return is_image_file(path) and os.path.normpath(path) not in self._skip

    def find_classes(self, directory):
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}

    def __getitem__(self, index: int):
        failures = 0
        for attempt in range(self._max_tries):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self.loader(path)
            except Exception as err:  # noqa: BLE001 - a corrupt file that slipped through verification
                failures += 1
                log.warning("skipping unreadable image %s: %s", path, err)
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target, failures
        raise RuntimeError(f"{self._max_tries} consecutive unreadable images from {self.samples[index][0]}")


def make_dataset(split_dir: str, classes: list[str], skip=(), transform=None):
    """A `TolerantImageFolder` over `split_dir` with the given class order, leaving out `skip` files."""
    return TolerantImageFolder(split_dir, classes, skip=skip, transform=transform)


class ShardSampler:
    """Every `world`-th index from `rank`, no padding: each validation image is counted exactly once."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def split_dataset(plan, split: str, transform, *, rank: int, world: int, batch: int | None = None, seed: int = 0):
    """One split of the data plan for a worker: of a shard set, this rank's own stream (`shard_reader`; `batch`
    for training, None for validation); of a folder, the whole split (a sampler shares it out)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(plan, ShardPlan):
        shards = plan.train_shards if split == "train" else plan.val_shards
        return ShardStream(plan.location, list(shards), transform, rank=rank, world=world, batch=batch, seed=seed,
                           shuffle_buffer=SHUFFLE_BUFFER if batch else 0, on_bad=_warn_bad_sample,
                           retry_limit_s=plan.retry_limit_s)
    folder, skip = (plan.train_dir, plan.train_skip) if split == "train" else (plan.val_dir, plan.val_skip)
    return make_dataset(folder, list(plan.classes), skip, transform)


def _warn_bad_sample(shard: str, what: str, reason: str) -> None:
    log.warning("skipping unreadable sample %s of shard %s: %s", what, shard, reason)

